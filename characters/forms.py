"""Admin form pieces for characters: alternate greetings edited as a list of text boxes, not JSON."""

from __future__ import annotations

from django import forms
from django.utils.html import format_html, format_html_join

from .models import Character

EMPTY_SLOTS = 1  # blank boxes offered after the existing greetings (more with "Add another greeting")


class GreetingListWidget(forms.Widget):
    """One textarea per greeting, all posted under the same name; empty boxes are ignored."""

    class Media:
        js = ["characters/greetings.js"]

    def value_from_datadict(self, data, files, name):
        return data.getlist(name) if hasattr(data, "getlist") else data.get(name, [])

    def value_omitted_from_data(self, data, files, name):
        return name not in data

    def render(self, name, value, attrs=None, renderer=None):
        items = [item for item in (value or []) if isinstance(item, str)] + [""] * EMPTY_SLOTS
        element_id = (attrs or {}).get("id") or f"id_{name}"
        boxes = format_html_join(
            "", '<li><textarea name="{}" rows="3" cols="80" class="vLargeTextField" aria-label="Alternate greeting {}">'
                '{}</textarea></li>',
            ((name, number, text) for number, text in enumerate(items, start=1)))
        return format_html(
            '<div class="greeting-list" id="{}"><ol style="margin:0;padding-left:1.5em">{}</ol>'
            '<button type="button" class="button greeting-add" data-name="{}">Add another greeting</button></div>',
            element_id, boxes, name)


class GreetingListField(forms.Field):
    widget = GreetingListWidget

    def __init__(self, **kwargs):
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def prepare_value(self, value):
        return value if isinstance(value, list) else []

    def to_python(self, value):
        if value in (None, ""):
            return []
        if isinstance(value, str):
            value = [value]
        # Windows line endings from browsers are normalised; blank boxes are dropped.
        return [item.replace("\r\n", "\n").strip() for item in value if isinstance(item, str) and item.strip()]


class CharacterAdminForm(forms.ModelForm):
    alternate_greetings = GreetingListField(
        label="Alternate greetings",
        help_text=Character._meta.get_field("alternate_greetings").help_text
        + " One greeting per box; empty boxes are ignored.")

    talkativeness = forms.FloatField(
        required=False, min_value=0.0, max_value=1.0,
        help_text=Character._meta.get_field("talkativeness").help_text + " Empty: 0.5.")

    class Meta:
        model = Character
        fields = "__all__"

    def clean_talkativeness(self):
        value = self.cleaned_data.get("talkativeness")
        return Character._meta.get_field("talkativeness").default if value is None else value
