"""URL routes of the proxy."""

from django.contrib import admin
from django.urls import path

from generation import views

urlpatterns = [
    path("generate-text/", views.GenerateTextView.as_view(), name="generate-text"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
]
