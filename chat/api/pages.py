"""The chat page (HTML): pick a character, chat over the WebSocket, reopen past conversations."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from characters.models import CharacterGroup
from characters.selectors import characters_active
from chat.prompting import prompt_greetings
from chat.selectors import user_display_name


@login_required
def chat_page(request):
    user_name = user_display_name(request.user) or "User"
    characters = [
        {"slug": c.slug, "name": c.name, "avatar": c.avatar.url if c.avatar else "",
         # [index, text] of each non-empty greeting; the index goes back with the first message.
         "greetings": [[index, text] for index, text in enumerate(prompt_greetings(character=c, user_name=user_name))
                       if text],
         "description": c.personality or c.description[:160]}
        for c in characters_active()
    ]
    groups = [
        {"slug": g.slug, "name": g.name, "avatar": "", "greetings": [], "group": True, "description": g.scenario[:160],
         "members": [{"slug": m.slug, "name": m.name, "avatar": m.avatar.url if m.avatar else ""}
                     for m in g.member_list() if m.is_active]}
        for g in CharacterGroup.objects.filter(is_active=True)
    ]
    return render(request, "chat/page.html", {"characters": characters, "groups": groups, "user_name": user_name})
