from django.contrib import admin

from .models import Scenario


@admin.register(Scenario)
class ScenarioAdmin(admin.ModelAdmin):
    list_display = ["title", "character", "keywords", "always_on", "position", "inclusion_group", "priority",
                    "enabled", "updated_at"]
    list_filter = ["enabled", "always_on", "position", "character"]
    search_fields = ["title", "content", "keywords", "secondary_keywords", "inclusion_group"]
    list_select_related = ["character"]
    autocomplete_fields = ["character"]
    fieldsets = [
        (None, {"fields": ["title", "character", "content"]}),
        ("When it fires", {
            "fields": ["keywords", "secondary_keywords", "selective_logic", "always_on", "case_sensitive", "whole_words",
                       "scan_depth", "priority", "probability", "enabled"],
            "description": "A keyword written /pattern/flags is a regular expression (flag i: any case). "
                           "Priority is SillyTavern's insertion order: higher fills the token budget first "
                           "(after always-on scenarios) and goes later, closer to the reply, in its position."}),
        ("Recursion", {"fields": ["exclude_recursion", "prevent_recursion"],
                       "description": "The text of a scenario that fires is searched for other scenarios' keywords "
                                      "(SCENARIO_MAX_RECURSION passes)."}),
        ("Inclusion group", {"fields": ["inclusion_group", "group_weight", "group_prioritize"]}),
        ("Timed effects", {"fields": ["sticky", "cooldown", "delay"],
                           "description": "Counted in messages of the conversation (the user's and the replies)."}),
        ("Characters", {"fields": ["character_filter", "character_filter_exclude"]}),
        ("Where it goes", {"fields": ["position", "depth", "depth_role"]}),
        ("Imported data", {"classes": ["collapse"], "fields": ["extensions"]}),
    ]
