"""manage.py import_card PATH [--update]: import a Character Card V1/V2 (JSON or PNG)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from characters.card_format import CardError
from characters.card_services import character_card_import


class Command(BaseCommand):
    help = "Import a Character Card (V2 or V1; .json, or .png with the card in its 'chara' chunk)."

    def add_arguments(self, parser):
        parser.add_argument("path", help="The card file.")
        parser.add_argument("--update", action="store_true",
                            help="Update the character whose slug matches the card's name instead of adding one.")

    def handle(self, *args, path, update, **options):
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise CommandError(f"{path}: cannot be read ({exc.strerror})") from None
        try:
            result = character_card_import(raw=raw, update=update)
        except CardError as exc:
            raise CommandError(f"{path}: {exc} Nothing was imported.") from None
        self.stdout.write(self.style.SUCCESS(result.summary()))
        for warning in result.warnings:
            self.stderr.write(self.style.WARNING(f"  warning: {warning}"))
