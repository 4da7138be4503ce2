"""Operations endpoints: /health (liveness), /ready (readiness), /metrics (Prometheus)."""

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .health import readiness
from chat.metrics import REGISTRY


@require_GET
def health(request):
    return JsonResponse({"status": "ok"})


@require_GET
def ready(request):
    ok, checks = readiness()
    return JsonResponse({"status": "ready" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


@require_GET
def metrics(request):
    if not settings.METRICS_ENABLED:
        return JsonResponse({"error": {"message": "Metrics are disabled.", "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}}, status=404)
    token = settings.METRICS_TOKEN
    if not token and not settings.METRICS_OPEN_WITHOUT_TOKEN:
        # Production (DEBUG off) never serves the figures to anyone who asks.
        return JsonResponse({"error": {"message": "Metrics need a token: set METRICS_TOKEN on the server and send it "
                                                  "as 'Authorization: Bearer <token>'.",
                                       "type": "authentication_error", "param": None, "code": "metrics_token_not_set"}},
                            status=401)
    if token:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), token.encode()):
            return JsonResponse({"error": {"message": "Send the metrics token as 'Authorization: Bearer <token>'.",
                                           "type": "authentication_error", "param": None, "code": "invalid_token"}},
                                status=401)
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
