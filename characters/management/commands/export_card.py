"""manage.py export_card SLUG --format json|png -o PATH: write a character as a Character Card V2."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from characters.models import Character
from characters.card_services import EXPORT_FORMATS, character_card_export


class Command(BaseCommand):
    help = "Export a character and its scenarios (as the lorebook) to a Character Card V2 file."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="The character's slug.")
        parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="json", dest="fmt")
        parser.add_argument("-o", "--output", help="Where to write; '-' or none writes JSON to standard output.")

    def handle(self, *args, slug, fmt, output, **options):
        character = Character.objects.filter(slug=slug).first()
        if character is None:
            raise CommandError(f"No character with slug {slug!r}.")
        card = character_card_export(character=character, fmt=fmt)
        if output in (None, "-"):
            if fmt == "png":
                raise CommandError("A PNG card needs -o PATH.")
            self.stdout.write(card.content.decode("utf-8"))
            return
        try:
            Path(output).write_bytes(card.content)
        except OSError as exc:
            raise CommandError(f"{output}: cannot be written ({exc.strerror})") from None
        self.stdout.write(f"Wrote {output} ({len(card.content):,} bytes).")
