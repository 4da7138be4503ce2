import io
import zipfile

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from scenarios.models import Scenario

from .card_format import CardError
from .forms import CharacterAdminForm
from .models import Character, CharacterGroup, GroupMember, SystemPrompt
from .card_services import EXPORT_FORMATS, card_max_bytes, character_card_export, character_card_import
from .world_info_services import WorldInfoError, world_info_export, world_info_import


@admin.register(SystemPrompt)
class SystemPromptAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "character_count", "updated_at"]
    list_filter = ["is_default"]
    search_fields = ["name", "content"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(character_total=Count("characters"))

    @admin.display(description="characters", ordering="character_total")
    def character_count(self, obj):
        return obj.character_total


class ScenarioInline(admin.StackedInline):
    model = Scenario
    extra = 0
    fields = ["title", "keywords", ("secondary_keywords", "selective_logic"), "always_on", "priority", "enabled", "scan_depth", "position",
              ("depth", "depth_role"), ("probability", "inclusion_group"), ("sticky", "cooldown", "delay"), "content"]
    show_change_link = True


class CardImportForm(forms.Form):
    card = forms.FileField(
        label="Card file",
        help_text="A Character Card V2 or V1: a .json file, or a .png with the card in its 'chara' chunk.",
    )
    update = forms.BooleanField(
        required=False, label="Update the existing character",
        help_text="When a character with the card's slug exists, update it (and its scenarios, matched by "
                  "title) instead of adding a copy.",
    )

    def clean_card(self):
        upload = self.cleaned_data["card"]
        limit = card_max_bytes()
        if upload.size > limit:
            raise forms.ValidationError(f"The file is {upload.size:,} bytes; cards may be at most {limit:,} bytes.")
        return upload


class WorldInfoImportForm(forms.Form):
    file = forms.FileField(label="World Info file", help_text="A SillyTavern World Info (lorebook) .json file.")
    character = forms.ModelChoiceField(
        queryset=Character.objects.all(), required=False,
        help_text="The character whose scenarios the entries become; empty: global scenarios. Scenarios of the "
                  "same title there are updated.")

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = card_max_bytes()
        if upload.size > limit:
            raise forms.ValidationError(f"The file is {upload.size:,} bytes; at most {limit:,} bytes are read.")
        return upload


def _download(card) -> HttpResponse:
    response = HttpResponse(card.content, content_type=card.content_type)
    response["Content-Disposition"] = f'attachment; filename="{card.filename}"'
    return response


@admin.register(Character)
class CharacterAdmin(admin.ModelAdmin):
    form = CharacterAdminForm
    actions = ["export_cards_json", "export_cards_png"]
    list_display = ["name", "slug", "tags", "is_active", "updated_at"]
    list_filter = ["is_active", "created_at"]
    search_fields = ["name", "slug", "description", "personality", "tags"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [ScenarioInline]
    fieldsets = [
        (None, {"fields": ["name", "slug", "is_active", "avatar", "tags"]}),
        ("Profile", {"fields": ["description", "personality", "setting", "greeting", "alternate_greetings",
                                "example_dialogue"]}),
        ("Instructions", {"fields": ["named_system_prompt", "system_prompt", "post_history_instructions"]}),
        ("Group chats", {"fields": ["talkativeness"]}),
        ("Lorebook", {"fields": ["scan_depth"],
                      "description": "How the character's scenarios (its lorebook) are looked for."}),
        ("Sampling defaults", {"fields": ["temperature", "top_p", "repetition_penalty", "max_tokens"],
                               "description": "Empty fields use the defaults from config.yaml."}),
        ("Card metadata", {"classes": ["collapse"],
                           "fields": ["creator", "character_version", "creator_notes", "extensions"]}),
    ]

    # --- Character Cards -------------------------------------------------------------------------------

    def get_urls(self):
        own = [
            path("import-card/", self.admin_site.admin_view(self.import_card_view),
                 name="characters_character_import_card"),
            path("<path:object_id>/export-card/<str:fmt>/", self.admin_site.admin_view(self.export_card_view),
                 name="characters_character_export_card"),
            path("import-world-info/", self.admin_site.admin_view(self.import_world_info_view),
                 name="characters_character_import_world_info"),
            path("export-world-info/", self.admin_site.admin_view(self.export_world_info_view),
                 name="characters_character_export_global_world_info"),
            path("<path:object_id>/export-world-info/", self.admin_site.admin_view(self.export_world_info_view),
                 name="characters_character_export_world_info"),
        ]
        return own + super().get_urls()

    def may_import_cards(self, request, *, update: bool = False) -> bool:
        """A card import adds a character and its lorebook as scenarios; with `update` it changes both."""
        needed = ["characters.add_character", "scenarios.add_scenario"]
        if update:
            needed += ["characters.change_character", "scenarios.change_scenario"]
        return request.user.has_perms(needed)

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "may_import_cards": self.may_import_cards(request),
                         "may_import_world_info": self.may_import_world_info(request)}
        return super().changelist_view(request, extra_context)

    # --- SillyTavern World Info files ------------------------------------------------------------------

    def may_import_world_info(self, request) -> bool:
        """A World Info import adds scenarios and updates those an earlier import of the same file made."""
        return request.user.has_perms(["scenarios.add_scenario", "scenarios.change_scenario"])

    def import_world_info_view(self, request):
        if not self.may_import_world_info(request):
            raise PermissionDenied
        form = WorldInfoImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            character = form.cleaned_data["character"]
            try:
                upload = form.cleaned_data["file"]
                result = world_info_import(raw=upload.read(), character=character, file_name=upload.name or "")
            except WorldInfoError as exc:
                form.add_error("file", f"{exc} Nothing was imported.")
            else:
                self.message_user(request, result.summary(), messages.WARNING if result.skipped else messages.SUCCESS)
                if character is not None:
                    return redirect(reverse("admin:characters_character_change", args=[character.pk]))
                return redirect(reverse("admin:scenarios_scenario_changelist"))
        context = {**self.admin_site.each_context(request), "opts": self.model._meta,
                   "title": "Import a World Info file", "form": form, "max_bytes": card_max_bytes(),
                   "world_info": True}
        return TemplateResponse(request, "admin/characters/character/import_card.html", context)

    @staticmethod
    def may_read_scenarios(request) -> bool:
        return request.user.has_perm("scenarios.view_scenario") or request.user.has_perm("scenarios.change_scenario")

    def has_export_permission(self, request, obj=None) -> bool:
        """A card carries the character's scenarios (its lorebook, with their World Info settings): exporting one
        reads both."""
        return self.has_view_or_change_permission(request, obj) and self.may_read_scenarios(request)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        context.update(may_export_cards=self.has_export_permission(request, obj),
                       may_export_world_info=self.may_read_scenarios(request))
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def export_world_info_view(self, request, object_id=None):
        """The character's scenarios (or, without one, the global ones) as a SillyTavern World Info file."""
        if not self.may_read_scenarios(request):
            raise PermissionDenied
        if object_id is None:
            scenarios, name, title = Scenario.objects.filter(character__isnull=True), "global", "Global scenarios"
        else:
            character = self.get_object(request, unquote(object_id))
            if character is None:
                raise Http404("No such character.")
            scenarios, name, title = character.scenarios.all(), character.slug, character.name
        response = HttpResponse(world_info_export(scenarios=scenarios.order_by("id"), name=title),
                                content_type="application/json")
        response["Content-Disposition"] = f'attachment; filename="{name}-world-info.json"'
        return response

    def import_card_view(self, request):
        if not self.may_import_cards(request):
            raise PermissionDenied
        form = CardImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            if not self.may_import_cards(request, update=form.cleaned_data["update"]):
                raise PermissionDenied
            try:
                result = character_card_import(raw=form.cleaned_data["card"].read(),
                                               update=form.cleaned_data["update"])
            except CardError as exc:
                form.add_error("card", f"{exc} Nothing was imported.")
            else:
                self.message_user(request, result.summary(), messages.SUCCESS)
                for warning in result.warnings:
                    self.message_user(request, warning, messages.WARNING)
                return redirect(reverse("admin:characters_character_change", args=[result.character.pk]))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Import a character card",
            "form": form,
            "max_bytes": card_max_bytes(),
        }
        return TemplateResponse(request, "admin/characters/character/import_card.html", context)

    def export_card_view(self, request, object_id, fmt):
        character = self.get_object(request, unquote(object_id))
        if character is None or fmt not in EXPORT_FORMATS:
            raise Http404("No such character or card format.")
        if not self.has_export_permission(request, character):
            raise PermissionDenied
        return _download(character_card_export(character=character, fmt=fmt))

    def _export_cards(self, queryset, fmt: str) -> HttpResponse:
        characters = list(queryset)
        if len(characters) == 1:
            return _download(character_card_export(character=characters[0], fmt=fmt))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for character in characters:
                card = character_card_export(character=character, fmt=fmt)
                archive.writestr(card.filename, card.content)
        response = HttpResponse(buffer.getvalue(), content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="character-cards-{fmt}.zip"'
        return response

    @admin.action(description="Export selected as Character Card V2 (JSON)", permissions=["export"])
    def export_cards_json(self, request, queryset):
        return self._export_cards(queryset, "json")

    @admin.action(description="Export selected as Character Card V2 (PNG)", permissions=["export"])
    def export_cards_png(self, request, queryset):
        return self._export_cards(queryset, "png")


class GroupMemberInline(admin.TabularInline):
    model = GroupMember
    extra = 2
    autocomplete_fields = ["character"]
    fields = ["character", "position"]


@admin.register(CharacterGroup)
class CharacterGroupAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "turn_mode", "is_active", "updated_at"]
    list_filter = ["is_active", "turn_mode"]
    search_fields = ["name", "slug", "scenario"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [GroupMemberInline]
    fields = ["name", "slug", "is_active", "turn_mode", "scenario"]
