"""The site's routes with the password-reset pages, which llmsite/urls.py adds only when mail can go out."""

from django.urls import include, path

from llmsite.urls import password_reset_routes
from llmsite.urls import urlpatterns as site_urlpatterns

urlpatterns = [path("accounts/", include(password_reset_routes)), *site_urlpatterns]
