from django.contrib import admin, messages

from .api_keys import api_key_issue, api_keys_revoke
from .models import ApiKey, Conversation, Message


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
