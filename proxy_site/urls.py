"""URL routes of the proxy."""

from django.contrib import admin
from django.urls import path, re_path

from generation import openai_views, views

urlpatterns = [
    path("generate-text/", views.GenerateTextView.as_view(), name="generate-text"),
    path(
        "v1/chat/completions",
        openai_views.ChatCompletionsView.as_view(),
        name="chat-completions",
    ),
    re_path(r"^v1/", openai_views.not_found),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
]
