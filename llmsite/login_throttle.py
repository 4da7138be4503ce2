"""Login throttling for the login pages (django-axes): the authentication backend that refuses a locked-out
username at a client address. Settings: AXES_* in llmsite/settings.py; decisions in deploy/README.md."""

from axes.backends import AxesStandaloneBackend


class LoginThrottleBackend(AxesStandaloneBackend):
    """django-axes' check for logins through a request (the login pages); authenticate() called by code
    with no request (a management command, the test client's login()) has no client to throttle and is
    left to the next backend instead of failing."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)
