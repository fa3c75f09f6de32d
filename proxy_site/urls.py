"""URL routes of the proxy."""

from django.contrib import admin
from django.urls import path, re_path
from drf_spectacular.views import SpectacularJSONAPIView

from generation import openai_resources, openai_views, views

urlpatterns = [
    path("generate-text/", views.GenerateTextView.as_view(), name="generate-text"),
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
    re_path(r"^v1/", openai_views.not_found),
    path("healthz", views.healthz, name="healthz"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    path("admin/", admin.site.urls),
]
