"""Delete background jobs past their expiry (JOB_TTL_SECONDS); run it from cron or a Celery beat."""

from django.core.management.base import BaseCommand

from chat.jobs import jobs_purge_expired


class Command(BaseCommand):
    help = "Delete expired background jobs (they are already invisible to clients)."

    def handle(self, *args, **options):
        self.stdout.write(f"Deleted {jobs_purge_expired()} expired job(s).")
