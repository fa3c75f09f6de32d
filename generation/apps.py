from django.apps import AppConfig


class GenerationConfig(AppConfig):
    name = "generation"
    verbose_name = "Text generation"

    def ready(self) -> None:
        from . import checks, upstream  # noqa: F401  (registers checks and signals)
