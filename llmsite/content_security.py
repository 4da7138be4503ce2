"""Content-Security-Policy for every page a browser renders: scripts, styles, images and connections from this
origin only, no plugins, no <base>, no framing. A script injected into a page then cannot run or send anything away.

- The site's own pages (chat, login, password pages): POLICY, set by `content_security_policy` in the URLconf.
- Every other HTML page (the admin, DRF's browsable API and its login): their templates use style attributes, so
  STYLED_POLICY allows inline styles (never inline scripts: neither has any); set by ContentSecurityMiddleware.
- The API documentation: Swagger UI with its start-up script served as a file (drf-spectacular's split view) and
  ReDoc, which write inline styles and run ReDoc's search in a blob: worker: DOCS_POLICY.
"""

from functools import wraps

from asgiref.sync import iscoroutinefunction

from llmsite.hybrid_middleware import HybridMiddleware

# 'self' covers ws:// and wss:// to this host in CSP Level 3 browsers: the chat page's WebSocket.
POLICY = ("default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
          "img-src 'self' data:; connect-src 'self'")
STYLED_POLICY = POLICY + "; style-src 'self' 'unsafe-inline'"
DOCS_POLICY = STYLED_POLICY + "; worker-src 'self' blob:"


def content_security_policy(view, policy: str = POLICY):
    """The view's responses carry `policy` (unless the view set its own)."""

    @wraps(view)
    def with_policy(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        response.headers.setdefault("Content-Security-Policy", policy)
        return response

    return with_policy


class ContentSecurityMiddleware(HybridMiddleware):
    """STYLED_POLICY on every HTML response that has no policy of its own (the admin's and DRF's views are many and
    not ours to decorate)."""

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._finish(request, self.get_response(request))

    async def __acall__(self, request):
        return self._finish(request, await self.get_response(request))

    @staticmethod
    def _finish(request, response):
        if response.headers.get("Content-Type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", STYLED_POLICY)
        return response
