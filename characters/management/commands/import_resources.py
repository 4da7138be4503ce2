"""Load character_profiles.txt and conversation_scenarios.txt into the database, idempotently."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from characters.services import characters_import_profiles
from characters.scenarios_import import scenarios_import


class Command(BaseCommand):
    help = "Import characters and scenarios from the plain-text resource files (re-running updates, never duplicates)."

    def add_arguments(self, parser):
        parser.add_argument("--profiles", default=str(settings.RESOURCES_DIR / "character_profiles.txt"),
                            help="Path of the character profiles file.")
        parser.add_argument("--scenarios", default=str(settings.RESOURCES_DIR / "conversation_scenarios.txt"),
                            help="Path of the scenarios file.")

    def handle(self, *args, profiles, scenarios, **options):
        any_errors = False
        for path, importer, noun in ((profiles, characters_import_profiles, "Characters"),
                                     (scenarios, scenarios_import, "Scenarios")):
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"{path}: cannot be read ({exc.strerror})") from None
            report = importer(text=text)
            self.stdout.write(f"{report.summary(noun)} ({path})")
            for label, names in (("created", report.created), ("updated", report.updated)):
                for name in names:
                    self.stdout.write(f"  {label}: {name}")
            for error in report.errors:
                any_errors = True
                self.stderr.write(f"  skipped: {error}")
        if any_errors:
            self.stderr.write(self.style.WARNING("Some blocks were skipped; fix them and run the command again."))
