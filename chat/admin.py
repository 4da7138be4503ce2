"""Chat's admin pages, and the prompt preview added to the character admin (characters cannot import chat)."""

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import NestedObjects, quote, unquote
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import router
from django.db.models import Count
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.text import capfirst

from characters.admin import CharacterAdmin
from characters.models import Character

from .api.keys import api_key_issue, api_key_own_user_create, api_keys_revoke
from .models import ApiKey, Conversation, Invitation, Message, UsageRecord
from .prompting import PromptPreview, prompt_preview
from .selectors import conversation_path
from .tenancy.usage import usage_by_day, usage_grouped, usage_totals

PREVIEW_PARAM = "preview_message"
PREVIEW_CONVERSATION_PARAM = "preview_conversation"
PREVIEW_MAX_CHARS = 2000


# Chats are personal data: only a user given `chat.view_conversation` explicitly sees them (conversations
# and their messages); `change` does not imply it, as it does for Django's other models.
VIEW_CHATS = "chat.view_conversation"


def can_view_chats(request) -> bool:
    return request.user.has_perm(VIEW_CHATS)


class ChatRecordInline(admin.TabularInline):
    """Shown to those who may read chats, and never written from the conversation's page."""

    extra = 0

    def has_view_permission(self, request, obj=None):
        return can_view_chats(request)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class MessageInline(ChatRecordInline):
    """A conversation's messages, read-only: the history is what the model saw and answered."""

    model = Message
    can_delete = False
    fields = ["parent", "role", "content", "prompt_tokens", "completion_tokens", "finish_reason", "stopped", "scenarios",
              "created_at"]
    readonly_fields = fields

    def has_delete_permission(self, request, obj=None):
        return False


class InvitationInline(ChatRecordInline):
    """Invitations not yet answered; an editor may withdraw one, not write one (invitations are the owner's)."""

    model = Invitation
    fields = ["username", "invitee", "created_at"]
    readonly_fields = fields

    def has_delete_permission(self, request, obj=None):
        return can_view_chats(request) and super().has_delete_permission(request, obj)


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "character", "owner", "updated_at"]
    list_filter = ["character", "created_at"]
    search_fields = ["title", "messages__content", "owner__username"]
    list_select_related = ["character", "owner"]
    readonly_fields = ["character", "owner", "active"]  # the active leaf moves by the tree's operations only
    inlines = [InvitationInline, MessageInline]

    def has_view_permission(self, request, obj=None):
        return can_view_chats(request)

    def has_add_permission(self, request):
        return False  # conversations are made by chatting

    def has_change_permission(self, request, obj=None):
        return can_view_chats(request) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return can_view_chats(request) and super().has_delete_permission(request, obj)

    def get_deleted_objects(self, objs, request):
        """What deleting conversations takes: their invitations, and their messages as a count. Django's own list
        would ask MessageAdmin's delete permission of each message (never given) and nest a chain of replies one
        level per reply, past Python's recursion limit. Nothing protects a conversation from deletion."""
        conversations = list(objs)
        perms_needed = set()
        if not all(self.has_delete_permission(request, conversation) for conversation in conversations):
            perms_needed.add(Conversation._meta.verbose_name)
        listed, message_total, invitation_total = [], 0, 0
        for conversation in conversations:
            messages_count = conversation.messages.count()
            invitations = [f"Invitation: {invitation}" for invitation in conversation.invitations.all()]
            message_total, invitation_total = message_total + messages_count, invitation_total + len(invitations)
            link = reverse("admin:chat_conversation_change", args=[quote(conversation.pk)])
            listed += [format_html('Conversation: <a href="{}">{}</a>', link, conversation),
                       [f"{messages_count} message(s)", *invitations]]
        model_count = {Conversation._meta.verbose_name_plural: len(conversations),
                       Message._meta.verbose_name_plural: message_total,
                       Invitation._meta.verbose_name_plural: invitation_total}
        return listed, {name: count for name, count in model_count.items() if count}, perms_needed, []

    def save_model(self, request, obj, form, change):
        # Only the fields the form changed (its many-to-many ones are saved apart): the whole row would write back
        # the active leaf read when the page was posted, over a reply stored since. updated_at is left alone too:
        # it is the version a running reply is stored against (conversation_advance), and this is no new exchange.
        changed = [name for name in form.changed_data if not obj._meta.get_field(name).many_to_many]
        if changed:
            obj.save(update_fields=changed)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """Messages, read-only for everyone and never deleted here: a message goes with its subtree and the active leaf
    moves on (message_delete, under the conversation's lease), or with its whole conversation."""

    list_display = ["__str__", "conversation", "role", "completion_tokens", "created_at"]
    list_filter = ["role", "created_at"]
    search_fields = ["content"]

    def has_view_permission(self, request, obj=None):
        return can_view_chats(request)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def may_issue_keys_for(acting, user) -> bool:
    """Only a superuser may issue or manage a key that acts as a staff member or a superuser."""
    return acting.is_superuser or not (user.is_staff or user.is_superuser)


def may_choose_key_users(acting) -> bool:
    """A key acting as an existing user reads that user's conversations through the API: only someone who may
    read conversations in the admin chooses whom a new key acts as; anyone else's keys get users of their own."""
    return acting.is_superuser or acting.has_perm(VIEW_CHATS)


class ApiKeyForm(forms.ModelForm):
    def clean_user(self):
        user = self.cleaned_data["user"]
        if not may_issue_keys_for(self.acting_user, user):
            raise forms.ValidationError("Only a superuser may issue a key that acts as a staff member or a superuser.")
        return user


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["name", "prefix", "user", "created_at", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["revoked_at", "expires_at"]
    search_fields = ["name", "prefix", "user__username"]
    raw_id_fields = ["user"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        if obj is None and not may_choose_key_users(request.user):
            return [field for field in fields if field != "user"]  # a user of its own, made on save
        return fields

    def get_readonly_fields(self, request, obj=None):
        # A key acts as the user it was issued for, for good: a new key is issued for another user.
        fields = ["prefix", "created_at", "revoked_at", "last_used_at"]
        return fields if obj is None else ["user", *fields]

    def get_queryset(self, request):
        keys = super().get_queryset(request)
        # Keys acting as staff are a superuser's to see, extend or revoke.
        return keys if request.user.is_superuser else keys.filter(user__is_staff=False, user__is_superuser=False)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user" and not request.user.is_superuser:
            kwargs["queryset"] = get_user_model().objects.filter(is_staff=False, is_superuser=False)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"acting_user": request.user})

    def save_model(self, request, obj, form, change):
        if not change:
            raw_key = api_key_issue(api_key=obj)
            if not may_choose_key_users(request.user):
                api_key_own_user_create(api_key=obj)
            obj.save()
            messages.warning(request, f"The new API key is {raw_key} — copy it now: it is stored hashed and "
                                      "cannot be shown again.")
            return
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request, queryset):
        count = api_keys_revoke(queryset=queryset)
        messages.success(request, f"Revoked {count} key(s).")


class CharacterAdminWithPreview(CharacterAdmin):
    """The character page with the composed prompt for a sample message (template: admin/characters/character)."""

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        message = request.GET.get(PREVIEW_PARAM, "").strip()[:PREVIEW_MAX_CHARS]
        conversation_id = request.GET.get(PREVIEW_CONVERSATION_PARAM, "").strip()[:36]
        extra_context.update(preview_param=PREVIEW_PARAM, preview_message=message,
                             preview_conversation_param=PREVIEW_CONVERSATION_PARAM,
                             preview_conversation=conversation_id)
        if message and request.method == "GET":
            character = self.get_object(request, unquote(object_id))
            if character is not None and conversation_id:
                extra_context["prompt_preview"] = self._conversation_preview(request, character, message,
                                                                             conversation_id)
            elif character is not None:
                # {{user}} stays "User": what an API request that names no one gets.
                extra_context["prompt_preview"] = prompt_preview(character=character, user_message=message)
        return super().change_view(request, object_id, form_url, extra_context)

    @staticmethod
    def _conversation_preview(request, character, message: str, conversation_id: str) -> PromptPreview:
        """The preview continuing a stored conversation of this character; chats are personal data, so only for
        editors who may view conversations (VIEW_CHATS), and one unknown or not of this character is refused
        with the same words (no hint whether it exists)."""
        conversation = None
        if can_view_chats(request):
            try:
                conversation = Conversation.objects.filter(pk=conversation_id, character=character).first()
            except ValidationError:  # not a UUID
                conversation = None
        if conversation is None:
            return PromptPreview(user_message=message, error=f"No conversation {conversation_id!r} of "
                                 f"{character.name} that you may view.")
        return prompt_preview(character=character, user_message=message, conversation=conversation,
                              path=conversation_path(conversation))


# chat is installed after characters, so the content app's admin is registered by now.
admin.site.unregister(Character)
admin.site.register(Character, CharacterAdminWithPreview)


class _ConversationsWithoutContents(NestedObjects):
    """Django's collector for a delete page, which collects conversations but not their messages and invitations
    (listed as counts instead): it would nest a chain of replies one level per reply, past Python's recursion
    limit. Nothing that a conversation's contents hold keeps it from being deleted."""

    def related_objects(self, related_model, related_fields, objs):
        if related_model in (Message, Invitation) and any(field.related_model is Conversation
                                                          for field in related_fields):
            return related_model._default_manager.none()
        return super().related_objects(related_model, related_fields, objs)


def _count_by_conversation(model, conversation_ids) -> dict:
    """{conversation id: how many of `model` (messages, invitations) it holds}, for those holding any."""
    return dict(model.objects.filter(conversation__in=conversation_ids).values("conversation")
                .annotate(count=Count("pk")).values_list("conversation", "count"))


class UserAdminWithChats(type(admin.site.get_model_admin(get_user_model()))):
    """The user admin (django.contrib.auth's, installed before chat), deleting a user's messages with their
    conversations: MessageAdmin deletes none on its own, which must not keep a user from being deleted. Each
    conversation is still checked with ConversationAdmin's permission."""

    def get_deleted_objects(self, objs, request):
        """Django's list of what deleting the users takes (its permission checks and protected objects), with
        each of their conversations' messages and invitations counted, as ConversationAdmin's page does: listed,
        a chain of a few thousand replies raised RecursionError, a 500."""
        objs = list(objs)
        if not objs:
            return [], {}, set(), []
        collector = _ConversationsWithoutContents(using=router.db_for_write(objs[0]._meta.model), origin=objs)
        collector.collect(objs)
        conversations = [conversation.pk for conversation in collector.model_objs.get(Conversation, ())]
        messages, invitations = _count_by_conversation(Message, conversations), _count_by_conversation(Invitation,
                                                                                                       conversations)
        perms_needed = set()

        def listed(obj):  # as django.contrib.admin.utils.get_deleted_objects lists an object
            opts = obj._meta
            if not self.admin_site.is_registered(type(obj)):
                return f"{capfirst(opts.verbose_name)}: {obj}"
            if not self.admin_site.get_model_admin(type(obj)).has_delete_permission(request, obj):
                perms_needed.add(opts.verbose_name)
            try:
                link = reverse(f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change",
                               args=[quote(obj.pk)])
            except NoReverseMatch:
                return f"{capfirst(opts.verbose_name)}: {obj}"
            if isinstance(obj, Conversation):
                return format_html('Conversation: <a href="{}">{}</a> with {} message(s) and {} invitation(s)', link,
                                   obj, messages.get(obj.pk, 0), invitations.get(obj.pk, 0))
            return format_html('{}: <a href="{}">{}</a>', capfirst(opts.verbose_name), link, obj)

        deleted = collector.nested(listed)
        protected = [listed(obj) for obj in collector.protected]
        model_count = {model._meta.verbose_name_plural: len(found) for model, found in collector.model_objs.items()}
        model_count |= {Message._meta.verbose_name_plural: sum(messages.values()),
                        Invitation._meta.verbose_name_plural: sum(invitations.values())}
        return deleted, {name: count for name, count in model_count.items() if count}, perms_needed, protected


admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), UserAdminWithChats)


# --- Usage ledger (chat/tenancy/) ---------------------------------------------------------------------

CHART_DAYS = 60      # the chart shows the last this many days that have usage in the filtered list
CHART_WIDTH, CHART_HEIGHT = 720, 160
GROUP_ROWS = 10      # rows in each "by key / user / character" table


def usage_chart(days: list[dict]) -> dict:
    """Bars of tokens per day (prompt below, completion on top) as SVG geometry, drawn by the template."""
    days = days[-CHART_DAYS:]
    peak = max((day["total_tokens"] for day in days), default=0) or 1
    step = CHART_WIDTH / max(len(days), 1)
    bars = []
    for index, day in enumerate(days):
        prompt_h = day["prompt_tokens"] / peak * CHART_HEIGHT
        completion_h = day["completion_tokens"] / peak * CHART_HEIGHT
        bars.append({**day, "x": round(index * step + step * 0.1, 1), "width": round(step * 0.8, 1),
                     "prompt_y": round(CHART_HEIGHT - prompt_h, 1), "prompt_h": round(prompt_h, 1),
                     "completion_y": round(CHART_HEIGHT - prompt_h - completion_h, 1),
                     "completion_h": round(completion_h, 1)})
    return {"bars": bars, "peak": peak if days else 0, "width": CHART_WIDTH, "height": CHART_HEIGHT,
            "first": days[0]["date"] if days else "", "last": days[-1]["date"] if days else ""}


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """The ledger, read-only: one row per generation; the list page charts the filtered rows per day and
    sums them per key, user and character (template: admin/chat/usagerecord/change_list.html)."""

    list_display = ["created_at", "owner", "api_key", "model", "character", "prompt_tokens", "completion_tokens",
                    "duration", "outcome"]
    list_filter = ["outcome", "model", "created_at", "api_key", "character"]
    search_fields = ["owner__username", "api_key__name", "api_key__prefix", "model"]
    list_select_related = ["owner", "api_key", "character"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        changelist = context.get("cl") if context else None
        if changelist is not None:
            records = changelist.queryset.order_by()
            context["usage_totals"] = usage_totals(records)
            context["usage_chart"] = usage_chart(usage_by_day(records))
            context["usage_groups"] = [
                ("API key", usage_grouped(records, "api_key", "api_key__name")[:GROUP_ROWS]),
                ("User", usage_grouped(records, "owner", "owner__username")[:GROUP_ROWS]),
                ("Character", usage_grouped(records, "character", "character__name")[:GROUP_ROWS]),
            ]
        return response
