"""Chat's admin pages, and the prompt preview added to the character admin (characters cannot import chat)."""

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote

from characters.admin import CharacterAdmin
from characters.models import Character

from .api.keys import api_key_issue, api_keys_revoke
from .models import ApiKey, Conversation, Message
from .prompting import prompt_preview

PREVIEW_PARAM = "preview_message"
PREVIEW_MAX_CHARS = 2000


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ["role", "content", "prompt_tokens", "completion_tokens", "finish_reason", "scenarios", "created_at"]
    readonly_fields = ["created_at"]
    filter_horizontal = []


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "character", "owner", "updated_at"]
    list_filter = ["character", "created_at"]
    search_fields = ["title", "messages__content", "owner__username"]
    list_select_related = ["character", "owner"]
    raw_id_fields = ["owner"]
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["__str__", "conversation", "role", "completion_tokens", "created_at"]
    list_filter = ["role", "created_at"]
    search_fields = ["content"]
    raw_id_fields = ["conversation"]
    filter_horizontal = ["scenarios"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "user", "created_at", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["revoked_at", "expires_at"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["prefix", "created_at", "revoked_at", "last_used_at"]
    raw_id_fields = ["user"]
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if not change:
            raw_key = api_key_issue(api_key=obj)
            obj.save()
            messages.warning(request, f"The new API key is {raw_key} — copy it now: it is stored hashed and "
                                      "cannot be shown again.")
            return
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = api_keys_revoke(queryset=queryset)
        messages.success(request, f"Revoked {count} key(s).")


class CharacterAdminWithPreview(CharacterAdmin):
    """The character page with the composed prompt for a sample message (template: admin/characters/character)."""

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        message = request.GET.get(PREVIEW_PARAM, "").strip()[:PREVIEW_MAX_CHARS]
        extra_context["preview_param"] = PREVIEW_PARAM
        extra_context["preview_message"] = message
        if message and request.method == "GET":
            character = self.get_object(request, unquote(object_id))
            if character is not None:
                # {{user}} stays "User": what an API request that names no one gets.
                extra_context["prompt_preview"] = prompt_preview(character=character, user_message=message)
        return super().change_view(request, object_id, form_url, extra_context)


# chat is installed after characters, so the content app's admin is registered by now.
admin.site.unregister(Character)
admin.site.register(Character, CharacterAdminWithPreview)
