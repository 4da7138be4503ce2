"""Plain functions that make the test data several test modules need: users, API keys and clients,
the demo content, characters, scenarios, tiny GGUF files, chat prompts.

Models are imported inside the functions, so importing this module needs no Django setup and loads
no inference library (tests/chat/test_lazy_loading.py checks collection).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --- users and API keys -----------------------------------------------------------------------------


def make_user(username: str = "user", **fields):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(username, **fields)


def make_superuser(username: str = "editor", email: str = "editor@example.com", password: str = "pw"):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_superuser(username, email, password)


def api_client(raw_key: str | None = None):
    """A DRF test client that sends `Authorization: Bearer <raw_key>` (none without a key)."""
    from rest_framework.test import APIClient

    client = APIClient()
    if raw_key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def make_api_client(username: str, *, key_name: str = "k"):
    """A new user with one API key, and a client that sends it; the client carries .user, .key, .raw_key."""
    from chat.api.keys import api_key_create

    user = make_user(username)
    key, raw_key = api_key_create(user=user, name=key_name)
    client = api_client(raw_key)
    client.user, client.key, client.raw_key = user, key, raw_key
    return client


# --- content ----------------------------------------------------------------------------------------


def import_demo_resources() -> None:
    """The demo characters and scenarios of resources/ (captain-mira, chef-luca, byte, ...), quietly."""
    from django.core.management import call_command

    with open(os.devnull, "w") as quiet:
        call_command("import_resources", stdout=quiet)


def make_character(slug: str = "mira", **fields):
    from characters.models import Character

    values = {"name": slug.title(), "slug": slug, "description": f"{slug} is a test character."}
    return Character.objects.create(**{**values, **fields})


def make_scenario(title: str, *, character=None, **fields):
    from scenarios.models import Scenario

    values = {"content": f"{title} content.", "keywords": ""}
    return Scenario.objects.create(title=title, character=character, **{**values, **fields})


# --- models and prompts -----------------------------------------------------------------------------


def write_tiny_gguf(path: Path, **options) -> Path:
    """A tiny random-weight llama model, written by scripts/make_tiny_gguf.py (`options`: its write_tiny_gguf's)."""
    spec = importlib.util.spec_from_file_location("make_tiny_gguf", ROOT / "scripts" / "make_tiny_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_gguf(path, **options)



def serve_tiny_model(settings, model: Path, *, context_length: int) -> None:
    """Point the site's models at a tiny random-weight file (replies are quick, their text does not matter) and turn
    the request rate limit off; `settings` is pytest-django's fixture, which restores both after the test."""
    import dataclasses

    models = tuple(dataclasses.replace(m, path=str(model), context_length=context_length)
                   for m in settings.LLMSITE.models)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)
    settings.API_RATE_LIMIT = ""

def chat_prompt(engine, system: str, question: str, *, site_system: bool = False) -> str:
    """A system message and one user question, rendered with the engine's chat template. `site_system`: the system
    message is the site's own content (as a character's), which other tenants' prompts may reuse."""
    return engine.render_chat([{"role": "system", "content": system}, {"role": "user", "content": question}],
                              shared_until=(0, len(system)) if site_system else None)
