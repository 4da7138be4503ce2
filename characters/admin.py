from django.contrib import admin

from scenarios.models import Scenario

from .models import Character, SystemPrompt


@admin.register(SystemPrompt)
class SystemPromptAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "updated_at"]
    list_filter = ["is_default"]
    search_fields = ["name", "content"]


class ScenarioInline(admin.StackedInline):
    model = Scenario
    extra = 0
    fields = ["title", "keywords", "secondary_keywords", "always_on", "priority", "enabled", "content"]
    show_change_link = True


@admin.register(Character)
class CharacterAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "tags", "is_active", "updated_at"]
    list_filter = ["is_active", "created_at"]
    search_fields = ["name", "slug", "description", "personality", "tags"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [ScenarioInline]
    fieldsets = [
        (None, {"fields": ["name", "slug", "is_active", "avatar", "tags"]}),
        ("Profile", {"fields": ["description", "personality", "setting", "greeting", "alternate_greetings",
                                "example_dialogue"]}),
        ("Instructions", {"fields": ["system_prompt", "post_history_instructions"]}),
        ("Sampling defaults", {"fields": ["temperature", "top_p", "repetition_penalty", "max_tokens"],
                               "description": "Empty fields use the defaults from config.yaml."}),
        ("Card metadata", {"classes": ["collapse"],
                           "fields": ["creator", "character_version", "creator_notes", "extensions"]}),
    ]
