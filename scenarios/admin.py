from django.contrib import admin

from .models import Scenario


@admin.register(Scenario)
class ScenarioAdmin(admin.ModelAdmin):
    list_display = ["title", "character", "keywords", "always_on", "priority", "enabled", "updated_at"]
    list_filter = ["enabled", "always_on", "character"]
    search_fields = ["title", "content", "keywords", "secondary_keywords"]
    list_select_related = ["character"]
    autocomplete_fields = ["character"]
    fieldsets = [
        (None, {"fields": ["title", "character", "content"]}),
        ("When it fires", {"fields": ["keywords", "secondary_keywords", "always_on", "case_sensitive",
                                      "whole_words", "scan_depth", "priority", "enabled"]}),
        ("Where it goes", {"fields": ["position"]}),
        ("Imported data", {"classes": ["collapse"], "fields": ["extensions"]}),
    ]
