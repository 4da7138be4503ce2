"""Reads of characters that other apps share: which characters are active, and finding one."""

from llmsite.digits import is_decimal

from .models import Character


def characters_active():
    return Character.objects.filter(is_active=True)


def character_find_active(*, slug_or_id: str) -> Character | None:
    """The active character with this slug, else with this numeric id; None when there is none."""
    character = characters_active().filter(slug=slug_or_id).first()
    if character is None and is_decimal(str(slug_or_id), max_digits=18):  # 18 digits always fit a 64-bit key
        character = characters_active().filter(pk=int(slug_or_id)).first()
    return character
