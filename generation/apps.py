from django.apps import AppConfig


class GenerationConfig(AppConfig):
    name = "generation"
    verbose_name = "Text generation"

    def ready(self) -> None:
        # Registers system checks, the client-reset signal and schema extensions.
        from . import checks, schema, upstream  # noqa: F401
