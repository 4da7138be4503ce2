"""Print a new API key (for scripts and operations)."""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from chat.api.keys import api_key_create, api_key_create_with_own_user


class Command(BaseCommand):
    help = ("Create an API key and print it once. Without --user the key acts as a new user of its own (it shares "
            "no conversations, jobs or cached replies with any other key); --user NAME makes it act as that user "
            "(created if missing), sharing that user's data with the user's other keys.")

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="What the key is for.")
        parser.add_argument("--user", default=None,
                            help="Username the key acts as (created if missing). Default: a new user for this key.")
        parser.add_argument("--expires-days", type=int, default=None, help="Days until the key expires.")

    def handle(self, *args, name, user, expires_days, **options):
        if expires_days is not None and expires_days <= 0:
            raise CommandError("--expires-days must be positive.")
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        if user is None:
            api_key, raw_key = api_key_create_with_own_user(name=name, expires_at=expires_at)
        else:
            owner, _ = get_user_model().objects.get_or_create(username=user)
            api_key, raw_key = api_key_create(user=owner, name=name, expires_at=expires_at)
        self.stderr.write(f"API key {name!r} acts as user {api_key.user.get_username()!r}; it is shown only once:")
        self.stdout.write(raw_key)
