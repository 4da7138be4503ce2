from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chat import error_views, ops_views, pages

urlpatterns = [
    path("", pages.chat_page, name="chat-page"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("health", ops_views.health, name="health"),
    path("ready", ops_views.ready, name="ready"),
    path("metrics", ops_views.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("v1/", include("chat.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api-auth/", include("rest_framework.urls")),
    # Any other path under /v1/ or /api/: a JSON 404 in the API's error shape, even with DEBUG on.
    re_path(r"^(?:v1|api)/", error_views.api_not_found, name="api-not-found"),
]
if settings.DEBUG:
    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)

handler404 = "chat.error_views.not_found"
handler500 = "chat.error_views.server_error"
