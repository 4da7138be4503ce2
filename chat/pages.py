"""The chat page (HTML): pick a character, chat over the WebSocket, reopen past conversations."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from characters.models import Character

from .prompting import prompt_greeting


@login_required
def chat_page(request):
    user_name = request.user.get_short_name() or request.user.get_username()
    characters = [
        {"slug": c.slug, "name": c.name, "avatar": c.avatar.url if c.avatar else "",
         "greeting": prompt_greeting(character=c, user_name="User") if c.greeting.strip() else "",
         "description": c.personality or c.description[:160]}
        for c in Character.objects.filter(is_active=True)
    ]
    return render(request, "chat/page.html", {"characters": characters, "user_name": user_name})
