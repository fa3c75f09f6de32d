"""URL routes of the proxy."""

from django.contrib import admin
from django.urls import path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularJSONAPIView

from generation import health, openai_resources, openai_views, views
from proxy_site import error_views, metrics

urlpatterns = [
    # The original interface's path, with or without the trailing slash: a
    # redirect would lose the POST body.
    re_path(
        r"^generate-text/?$", views.GenerateTextView.as_view(), name="generate-text"
    ),
    path(
        "v1/chat/completions",
        openai_views.ChatCompletionsView.as_view(),
        name="chat-completions",
    ),
    path("v1/models", openai_resources.ModelListView.as_view(), name="models"),
    path(
        "v1/models/<path:model>",
        openai_resources.ModelDetailView.as_view(),
        name="model-detail",
    ),
    path("v1/embeddings", openai_resources.EmbeddingsView.as_view(), name="embeddings"),
    # Unknown /v1/ URLs get OpenAI's error body also while DEBUG is on, when
    # Django shows its own 404 page instead of handler404. API clients send
    # no CSRF token, and the CSRF check would turn a POST's 404 into a 403.
    re_path(r"^v1/", csrf_exempt(error_views.not_found)),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("readyz", health.readyz, name="readyz"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    path("admin/", admin.site.urls),
]

handler400 = "proxy_site.error_views.bad_request"
handler403 = "proxy_site.error_views.permission_denied"
handler404 = "proxy_site.error_views.not_found"
handler500 = "proxy_site.error_views.server_error"
