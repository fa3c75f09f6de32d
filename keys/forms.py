"""Admin forms."""

from django import forms


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

    def evaluate_arguments(self) -> dict:
        data = self.cleaned_data
        messages = []
        if data["system"]:
            messages.append({"role": "system", "content": data["system"]})
        messages.append({"role": "user", "content": data["prompt"]})
        return {
            "messages": messages,
            "model": data["model"] or None,
            "max_tokens": data["max_tokens"],
        }
