"""Login throttling for the login pages (django-axes): the authentication backend that refuses a locked-out
client, the handler that gives each lockout its own limit, and the same count for wrong old passwords on the
password-change pages. Settings: AXES_* and LOGIN_* in llmsite/settings.py; decisions in deploy/README.md."""

from functools import wraps

from axes.backends import AxesStandaloneBackend
from axes.handlers.database import AxesDatabaseHandler
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_failure_limit, get_lockout_parameters, get_lockout_response
from django.conf import settings
from django.contrib.auth import logout
from django.contrib.auth.signals import user_login_failed

ADDRESS_ONLY = (["ip_address"], "ip_address")  # how AXES_LOCKOUT_PARAMETERS may name the address-only lockout


class LoginThrottleBackend(AxesStandaloneBackend):
    """django-axes' check for logins through a request (the login pages); authenticate() called by code
    with no request (a management command, the test client's login()) has no client to throttle and is
    left to the next backend instead of failing."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)


class LoginAttemptsHandler(AxesDatabaseHandler):
    """axes' database handler with a limit per lockout: a username at an address is locked out after
    AXES_FAILURE_LIMIT failures, an address (password spraying: many usernames, few tries each) after
    LOGIN_ADDRESS_FAILURE_LIMIT failures of any usernames.

    axes compares one count with one limit: the failures of each lockout are scaled to AXES_FAILURE_LIMIT
    (count × limit // its own limit reaches limit exactly when count reaches its own limit)."""

    def get_failures(self, request, credentials=None) -> int:
        limit = get_failure_limit(request, credentials)
        groups = zip(get_lockout_parameters(request, credentials), self.get_user_attempts(request, credentials))
        scaled = [0]
        for parameters, attempts in groups:
            failures = sum(attempts.values_list("failures_since_start", flat=True))
            own = settings.LOGIN_ADDRESS_FAILURE_LIMIT if parameters in ADDRESS_ONLY else limit
            scaled.append(failures * limit // own)
        return max(scaled)

    def reset_user_attempts(self, request, credentials=None) -> int:
        """A successful login clears its username's failures at that address, not the address's lockout:
        a sprayer holding one valid account must not reset the count by logging in with it."""
        groups = zip(get_lockout_parameters(request, credentials), self.filter_user_attempts(request, credentials))
        return sum(attempts.delete()[0] for parameters, attempts in groups if parameters not in ADDRESS_ONLY)


def old_password_throttled(view):
    """A password-change view whose wrong old passwords count as failed logins of the user at the client's
    address: PasswordChangeForm checks the password itself, past django-axes, so a stolen session could guess
    the password without limit. At the lockout the session is logged out and the answer is the lockout page
    (429); the login page then refuses that username there too."""

    @wraps(view)
    def throttled(request, *args, **kwargs):
        if request.method != "POST" or not request.user.is_authenticated:
            return view(request, *args, **kwargs)
        credentials = {settings.AXES_USERNAME_FORM_FIELD: request.user.get_username()}
        if not AxesProxyHandler.is_allowed(request, credentials):
            logout(request)
            return get_lockout_response(request, None, credentials)
        response = view(request, *args, **kwargs)
        form = (getattr(response, "context_data", None) or {}).get("form")
        if form is not None and form.has_error("old_password", "password_incorrect"):
            user_login_failed.send(sender=__name__, credentials=credentials, request=request)
            if getattr(request, "axes_locked_out", False):
                logout(request)  # AxesMiddleware turns the response into the lockout page
        return response

    return throttled
