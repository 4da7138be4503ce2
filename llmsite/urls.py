"""URL routes: the chat page, accounts, operations endpoints, the admin, the API and its documentation."""

from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView

from chat.api import error_views, pages, tokenize
from chat.api.urls import both
from chat.ops import views as ops_views
from llmsite.content_security import DOCS_POLICY, content_security_policy
from llmsite.login_throttle import old_password_throttled
from llmsite.password_reset_throttle import ThrottledPasswordResetView

csp = content_security_policy  # the site's own pages (llmsite/content_security.py)
account_routes = [
    path("login/", csp(auth_views.LoginView.as_view()), name="login"),
    path("logout/", csp(auth_views.LogoutView.as_view()), name="logout"),
    path("password_change/", csp(old_password_throttled(auth_views.PasswordChangeView.as_view())),
         name="password_change"),
    path("password_change/done/", csp(auth_views.PasswordChangeDoneView.as_view()), name="password_change_done"),
]
# Password reset mails a link: without a way to send mail (EMAIL_HOST or EMAIL_BACKEND) the pages
# would fail with a 500, so they exist only when mail can go out. Requests are throttled (mail to a victim).
password_reset_routes = [
    path("password_reset/", csp(ThrottledPasswordResetView.as_view()), name="password_reset"),
    path("password_reset/done/", csp(auth_views.PasswordResetDoneView.as_view()), name="password_reset_done"),
    path("reset/<uidb64>/<token>/", csp(auth_views.PasswordResetConfirmView.as_view()), name="password_reset_confirm"),
    path("reset/done/", csp(auth_views.PasswordResetCompleteView.as_view()), name="password_reset_complete"),
]
if settings.PASSWORD_RESET_ENABLED:
    account_routes += password_reset_routes

urlpatterns = [
    path("", csp(pages.chat_page), name="chat-page"),
    path("accounts/", include(account_routes)),
    path("health", ops_views.health, name="health"),
    path("ready", ops_views.ready, name="ready"),
    path("metrics", ops_views.metrics, name="metrics"),
    # The admin's own password change, with wrong old passwords counted as failed logins (llmsite/login_throttle.py).
    path("admin/password_change/", admin.site.admin_view(old_password_throttled(admin.site.password_change),
                                                         cacheable=True)),
    path("admin/", admin.site.urls),
    path("v1/", include("chat.api.urls")),
    # llama-server's paths, at the root as it serves them (and with a trailing slash, as /v1/'s are).
    *both("tokenize", tokenize.TokenizeView, "tokenize"),
    *both("detokenize", tokenize.DetokenizeView, "detokenize"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", csp(SpectacularSwaggerSplitView.as_view(url_name="schema"), DOCS_POLICY), name="swagger-ui"),
    path("api/redoc/", csp(SpectacularRedocView.as_view(url_name="schema"), DOCS_POLICY), name="redoc"),
    path("api-auth/", include("rest_framework.urls")),
    # Any other path under the API's (chat.errors.is_api_path): a JSON 404 in the API's error shape, even with DEBUG on.
    re_path(r"^(?:v1|api|tokenize|detokenize)/", error_views.api_not_found, name="api-not-found"),
]
# Avatars: Nginx serves /media/ in production (deploy/nginx.conf.template); daphne does in DEBUG.
if settings.DEBUG:
    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)

handler404 = "chat.api.error_views.not_found"
handler500 = "chat.api.error_views.server_error"
