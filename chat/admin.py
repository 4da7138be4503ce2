from django.contrib import admin

from .models import Conversation, Message


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
