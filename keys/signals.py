"""Raise a tier's `rules_version` whenever its prompt rules change.

Workers keep each tier's rule list under the tier's `rules_version` (see
keys.rules.tier_rules), and read that value with every key, so raising it is
what tells every process, on any host, to read the rules again.
"""

from django.db.models import F, QuerySet
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from .models import PromptRule, Tier


def touch_tiers(tiers: QuerySet) -> None:
    """Raise the rules version of every tier in `tiers`."""
    tiers.update(rules_version=F("rules_version") + 1)


@receiver(post_save, sender=PromptRule)
def _rule_saved(sender, instance: PromptRule, **kwargs) -> None:
    touch_tiers(Tier.objects.filter(rules=instance))


@receiver(post_delete, sender=PromptRule)
def _rule_deleted(sender, instance: PromptRule, **kwargs) -> None:
    # Deleting a rule deletes its links without an m2m_changed signal, and
    # they are gone by now, so every tier is touched. Deletions are rare.
    touch_tiers(Tier.objects.all())


@receiver(m2m_changed, sender=Tier.rules.through)
def _tier_rules_changed(sender, instance, action: str, reverse: bool, pk_set, **kw):
    if not action.startswith("post_"):
        return
    if reverse:
        # `instance` is a rule, and pk_set contains the tiers (None after a clear).
        tiers = Tier.objects.all()
        touch_tiers(tiers if pk_set is None else tiers.filter(pk__in=pk_set))
        return
    touch_tiers(Tier.objects.filter(pk=instance.pk))
    # The caller's copy follows, so that it does not read the old list.
    instance.refresh_from_db(fields=["rules_version"])
