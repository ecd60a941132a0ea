"""The demo's bucket definitions and journeys (``BUCKETS_DEFINITIONS=workflows.demo_buckets``).

Handlers record what they were given in :data:`DELIVERED` (a real application would send an
e-mail, call a webhook, ...): ``buckets demo`` prints them per simulated day.
"""

from __future__ import annotations

from buckets import b, define_bucket, journey
from buckets.dispatcher import Enrollment

DELIVERED: list[Enrollment] = []

power_users = define_bucket(
    id="power-users",
    name="Power users",
    description="Used a feature at least 10 times in the last 30 days.",
    criteria=b.event("feature.used").within("30d").at_least(10),
    entry_limit="once_per_period",
    entry_period="7d",
)

went_dormant = define_bucket(
    id="went-dormant",
    name="Went dormant",
    description="Used a feature once, but not in the last 7 days.",
    criteria=b.all(
        b.event("feature.used").exists(), b.event("feature.used").within("7d").not_exists()
    ),
    entry_limit="once_per_period",
    entry_period="30d",
    max_dwell="60d",
)

trial = define_bucket(
    id="trial",
    name="On a trial",
    description="Plan is trial; leaves after 14 days at the latest (trial over).",
    criteria=b.prop("plan").eq("trial"),
    max_dwell="14d",
)

trial_ending = define_bucket(
    id="trial-ending",
    name="Trial ends in 3 days",
    description="On a trial whose trial_ends_at falls in the next 3 days (joins by the clock).",
    criteria=b.all(b.prop("plan").eq("trial"), b.prop("trial_ends_at").within_next("3d")),
)


abandoned_cart = define_bucket(
    id="abandoned-cart",
    name="Abandoned cart",
    description="Added to the cart, no order within the hour (carts of the last 7 days).",
    criteria=b.sequence(
        b.step("cart.added"), b.step("order.completed", gap="1h", absent=True), within="7d"
    ),
    entry_limit="once_per_period",
    entry_period="1d",
)


@journey(id="cart-reminder", trigger=abandoned_cart.entered, exit_on=[abandoned_cart.left])
def cart_reminder(enrollment: Enrollment) -> None:
    DELIVERED.append(enrollment)


@journey(id="winback", trigger=went_dormant.entered, exit_on=[went_dormant.left])
def winback(enrollment: Enrollment) -> None:
    DELIVERED.append(enrollment)


@journey(id="power-perks", trigger=power_users.entered, exit_on=[power_users.left])
def power_perks(enrollment: Enrollment) -> None:
    DELIVERED.append(enrollment)


@journey(id="trial-ending-reminder", trigger=trial_ending.entered, exit_on=[trial_ending.left])
def trial_ending_reminder(enrollment: Enrollment) -> None:
    DELIVERED.append(enrollment)


@journey(id="trial-onboarding", trigger=trial.entered, exit_on=[trial.left])
def trial_onboarding(enrollment: Enrollment) -> None:
    DELIVERED.append(enrollment)
