"""Admin forms."""

from django import forms

from generation.policy import trial_arguments
from generation.serializers import GenerateTextSerializer


class TryPromptForm(forms.Form):
    """A request to decide against a tier's rules, as `check_prompt` takes it."""

    prompt = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 80}))
    system = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 80}),
        help_text="Optional system text sent with the prompt.",
    )
    model = forms.CharField(
        required=False, max_length=128, help_text="Empty: the tier's default model."
    )
    max_tokens = forms.IntegerField(
        required=False, min_value=1, help_text="Empty: the tier's default."
    )

    def clean(self) -> dict:
        cleaned = super().clean()
        # The API's own validation decides, so that a prompt it would reject as
        # invalid (a blank one, say) is not reported as allowed here.
        data = {
            name: value for name, value in cleaned.items() if value not in ("", None)
        }
        serializer = GenerateTextSerializer(data=data)
        if not serializer.is_valid():
            for field, errors in serializer.errors.items():
                self.add_error(field if field in self.fields else None, errors)
            return cleaned
        self.validated = serializer.validated_data
        return cleaned

    def evaluate_arguments(self) -> dict:
        return trial_arguments(self.validated)
