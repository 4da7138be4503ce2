#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    if sys.argv[1:2] == ["serve"]:
        # Before Django is set up: loading the daphne app makes the server's event loop (llmsite/event_loop.py).
        from django.conf import settings

        from llmsite.event_loop import install_event_loop

        install_event_loop(settings.EVENT_LOOP)
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
