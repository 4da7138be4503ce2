"""Print a new API key (for scripts and operations)."""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from chat.api.keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key and print it once. The key acts as --user (created if missing)."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="What the key is for.")
        parser.add_argument("--user", default="api", help="Username the key acts as (default: api).")
        parser.add_argument("--expires-days", type=int, default=None, help="Days until the key expires.")

    def handle(self, *args, name, user, expires_days, **options):
        if expires_days is not None and expires_days <= 0:
            raise CommandError("--expires-days must be positive.")
        owner, _ = get_user_model().objects.get_or_create(username=user)
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        _, raw_key = api_key_create(user=owner, name=name, expires_at=expires_at)
        self.stdout.write(raw_key)
