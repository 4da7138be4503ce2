"""Password-reset requests throttled per client address and per email address (PASSWORD_RESET_RATE_LIMIT each,
counted on the shared cache as the API's rate limit is), so that nobody can fill a victim's inbox with reset
mails. Over a limit the form comes back with an error, status 429 and Retry-After, whether or not the address
belongs to an account: the answer tells nothing about who has one."""

import hashlib
import math

from django.conf import settings
from django.contrib.auth.views import PasswordResetView

from chat.api.throttling import rate_limit_wait


def password_reset_wait(*, client_address: str | None, email: str) -> float | None:
    """Count one reset request; None when allowed, else the seconds until the longer of the two windows ends."""
    rate = settings.PASSWORD_RESET_RATE_LIMIT
    mailbox = hashlib.sha256(email.strip().casefold().encode()).hexdigest()  # no email address in cache keys
    waits = [rate_limit_wait(f"password-reset:addr:{client_address}", rate=rate),
             rate_limit_wait(f"password-reset:email:{mailbox}", rate=rate)]
    return max((wait for wait in waits if wait is not None), default=None)


class ThrottledPasswordResetView(PasswordResetView):
    def form_valid(self, form):
        wait = password_reset_wait(client_address=self.request.META.get("REMOTE_ADDR"),
                                   email=form.cleaned_data["email"])
        if wait is None:
            return super().form_valid(form)
        minutes = math.ceil(wait / 60)
        form.add_error("email", f"Too many password reset requests. Try again in {minutes} "
                                f"minute{'s' if minutes != 1 else ''}.")
        response = self.form_invalid(form)
        response.status_code = 429
        response["Retry-After"] = str(math.ceil(wait))
        return response
