"""The Responses API's answers as typed schemas for OpenAPI (the objects themselves are built in
chat/api/response_events.py; these describe them for /api/schema/ and the generated clients)."""

from rest_framework import serializers


class OutputTextSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["output_text"])
    text = serializers.CharField()
    annotations = serializers.ListField(child=serializers.DictField())
    logprobs = serializers.ListField(child=serializers.DictField())


class OutputItemSerializer(serializers.Serializer):
    """A `message` item (role, content) or a `function_call` item (call_id, name, arguments)."""

    type = serializers.ChoiceField(choices=["message", "function_call"])
    id = serializers.CharField()
    status = serializers.ChoiceField(choices=["in_progress", "completed", "incomplete"])
    role = serializers.CharField(required=False, help_text="message: always assistant.")
    content = OutputTextSerializer(many=True, required=False, help_text="message: its text.")
    call_id = serializers.CharField(required=False, help_text="function_call: answer it with a "
                                                               "function_call_output of this call_id.")
    name = serializers.CharField(required=False, help_text="function_call: the function.")
    arguments = serializers.CharField(required=False, help_text="function_call: JSON text.")


class InputTokensDetailsSerializer(serializers.Serializer):
    cached_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()


class OutputTokensDetailsSerializer(serializers.Serializer):
    reasoning_tokens = serializers.IntegerField()


class ResponseUsageSerializer(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    input_tokens_details = InputTokensDetailsSerializer()
    output_tokens = serializers.IntegerField()
    output_tokens_details = OutputTokensDetailsSerializer()
    total_tokens = serializers.IntegerField()


class ResponseConversationSerializer(serializers.Serializer):
    id = serializers.UUIDField(help_text="The stored conversation (also at /v1/conversations/<id>/).")


class ResponseObjectSerializer(serializers.Serializer):
    """A `response` object, as created, streamed in response.completed, and retrieved."""

    id = serializers.CharField(help_text="Stored: resp_<conversation id>_<n>; not stored: a random id.")
    object = serializers.CharField(help_text="Always \"response\".")
    created_at = serializers.IntegerField()
    status = serializers.ChoiceField(choices=["completed", "incomplete"])
    model = serializers.CharField()
    output = OutputItemSerializer(many=True)
    usage = ResponseUsageSerializer(allow_null=True)
    error = serializers.DictField(allow_null=True)
    incomplete_details = serializers.DictField(allow_null=True, help_text='{"reason": "max_output_tokens"}')
    previous_response_id = serializers.CharField(allow_null=True)
    conversation = ResponseConversationSerializer(allow_null=True, help_text="null when not stored.")
    instructions = serializers.CharField(allow_null=True)
    metadata = serializers.DictField(child=serializers.CharField())
    max_output_tokens = serializers.IntegerField(allow_null=True)
    parallel_tool_calls = serializers.BooleanField()
    temperature = serializers.FloatField(allow_null=True)
    top_p = serializers.FloatField(allow_null=True)
    tools = serializers.ListField(child=serializers.DictField())
    tool_choice = serializers.JSONField()
    store = serializers.BooleanField(help_text="Whether it was stored (retrievable and continuable).")
    text = serializers.DictField()
    truncation = serializers.CharField()
    user = serializers.CharField(allow_null=True)
    background = serializers.BooleanField()
    reasoning = serializers.DictField(allow_null=True)


class ResponseDeletedSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always \"response\".")
    deleted = serializers.BooleanField()
