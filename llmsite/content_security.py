"""Content-Security-Policy for the site's own pages (the chat page, login and password pages): scripts, styles,
images and connections from this origin only (the page's one script file; its data is json_script, which is not
run), no plugins, no <base>, no framing. A script injected into a page then cannot run or send anything away.

Not on the admin (its change forms and the usage chart use style attributes) nor on the API documentation
pages (drf-spectacular's inline scripts).
"""

from functools import wraps

# 'self' covers ws:// and wss:// to this host in CSP Level 3 browsers: the chat page's WebSocket.
POLICY = ("default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
          "img-src 'self' data:; connect-src 'self'")


def content_security_policy(view):
    """The view's responses carry POLICY (unless the view set its own)."""

    @wraps(view)
    def with_policy(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response

    return with_policy
