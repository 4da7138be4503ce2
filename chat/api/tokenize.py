"""POST /tokenize and /detokenize in llama-server's request and response shapes (SillyTavern's "API tokenizer"
mode, budget displays), authenticated and rate-limited like the rest of the API."""

from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from chat.services import text_tokenize, tokens_detokenize

from .serializers import BoundedListField
from .views import ERRORS

MAX_TOKENS_DETOKENIZED = 100_000


class TokenizeRequestSerializer(serializers.Serializer):
    content = serializers.CharField(allow_blank=True, trim_whitespace=False)
    add_special = serializers.BooleanField(required=False, default=False,
                                           help_text="Add the tokens the model puts before a prompt (BOS).")
    parse_special = serializers.BooleanField(required=False, default=True,
                                             help_text="Read control-token texts such as <|im_end|> as those tokens.")
    with_pieces = serializers.BooleanField(required=False, default=False,
                                           help_text="Answer {id, piece} objects instead of bare ids.")
    model = serializers.CharField(required=False, allow_blank=True, max_length=200,
                                  help_text="A configured model (default: the default model).")


class DetokenizeRequestSerializer(serializers.Serializer):
    tokens = BoundedListField(child=serializers.IntegerField(min_value=0, max_value=2**31 - 1),
                                   max_length=MAX_TOKENS_DETOKENIZED, allow_empty=True)
    model = serializers.CharField(required=False, allow_blank=True, max_length=200)


class TokenPieceSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    piece = serializers.CharField(help_text="The token's text.")


class TokenIdsSerializer(serializers.Serializer):
    tokens = serializers.ListField(child=serializers.IntegerField())


class TokenPiecesSerializer(serializers.Serializer):
    tokens = TokenPieceSerializer(many=True)


TOKENIZE_RESPONSE = PolymorphicProxySerializer(
    component_name="TokenizeResponse", serializers=[TokenIdsSerializer, TokenPiecesSerializer],
    resource_type_field_name=None)


class DetokenizeResponseSerializer(serializers.Serializer):
    content = serializers.CharField()


class TokenizeView(APIView):
    """The tokens of a text: {"tokens": [ids]}, or [{"id", "piece"}] with with_pieces."""

    @extend_schema(request=TokenizeRequestSerializer, responses={200: TOKENIZE_RESPONSE, **ERRORS})
    def post(self, request):
        serializer = TokenizeRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        return Response(text_tokenize(model=data.get("model"), content=data["content"],
                                      add_special=data["add_special"], parse_special=data["parse_special"],
                                      with_pieces=data["with_pieces"]))


class DetokenizeView(APIView):
    """The text of token ids: {"content": "..."}."""

    @extend_schema(request=DetokenizeRequestSerializer, responses={200: DetokenizeResponseSerializer, **ERRORS})
    def post(self, request):
        serializer = DetokenizeRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return Response(tokens_detokenize(model=serializer.validated_data.get("model"),
                                          tokens=serializer.validated_data["tokens"]))
