"""Django settings: one file, values from the environment, embedded defaults that need nothing installed.

A local `.env` file (git-ignored; `make run` writes one with DEBUG=1 and a generated SECRET_KEY, so
that `manage.py` commands work after it as the README shows) sets the variables the environment does
not: the environment always wins; LLMSITE_ENV_FILE names another file, empty for none. A deployment
without that file keeps the production defaults.

Unset variables give the embedded setup (SQLite, local-memory cache, in-memory channel layer, Celery
tasks run inline) with production-safe defaults: DEBUG is off unless DEBUG=1 (`make run` and the tests
opt in). DATABASE_URL and REDIS_URL switch to PostgreSQL and Redis. Every value is checked here, so a
typo stops start-up with one line instead of failing requests later.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url

from llmsite.config import ConfigError, load_config
from llmsite.event_loop import EVENT_LOOPS
from llmsite.env import (SettingError, env_bool, env_float, env_int, env_list, env_log_level, env_rate, env_url,
                        load_env_file, redis_database)

BASE_DIR = Path(__file__).resolve().parent.parent

ENV_FILE = os.environ.get("LLMSITE_ENV_FILE", str(BASE_DIR / ".env")).strip()
if ENV_FILE:
    load_env_file(ENV_FILE)

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise SettingError("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "insecure-development-key-only-for-debug-mode"  # noqa: S105 - DEBUG only

# "testserver" is the host of Django's test client: a name for the local setup (DEBUG), not for production.
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] + (["testserver"] if DEBUG else []))
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# config.yaml: the model(s), the fallback system prompt, default sampling. A bad file stops start-up
# with one line (SystemExit prints it without a traceback).
LLMSITE_CONFIG_PATH = os.environ.get("LLMSITE_CONFIG", str(BASE_DIR / "config.yaml"))
try:
    LLMSITE = load_config(LLMSITE_CONFIG_PATH, base_dir=BASE_DIR,
                          overrides={"model_path": os.environ.get("LLMSITE_MODEL_PATH"),
                                     # config.yaml's `weights` belongs to its file: another file loads as it is
                                     # unless LLMSITE_MODEL_WEIGHTS says otherwise.
                                     "weights": os.environ.get("LLMSITE_MODEL_WEIGHTS",
                                                               "" if os.environ.get("LLMSITE_MODEL_PATH") else None),
                                     "gpu_layers": os.environ.get("LLMSITE_GPU_LAYERS"),
                                     "threads": os.environ.get("LLMSITE_THREADS")})
except ConfigError as exc:
    sys.exit(f"llmsite: configuration error: {exc}")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",  # login throttling (see LOGIN_* below)
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc files served from here, not a CDN
    "channels",
    "characters",
    "scenarios",
    "chat",
]

MIDDLEWARE = [
    "chat.ops.middleware.RequestIdMiddleware",
    "chat.ops.middleware.RequestLogMiddleware",
    "chat.ops.drain.DrainMiddleware",  # after SIGTERM: new API requests 503 (manage.py serve)
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "llmsite.content_security.ContentSecurityMiddleware",
    "axes.middleware.AxesMiddleware",  # last: turns a lockout into the 429 page
]

ROOT_URLCONF = "llmsite.urls"
WSGI_APPLICATION = "llmsite.wsgi.application"
ASGI_APPLICATION = "llmsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    try:
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL,
                                                      conn_max_age=env_int("DB_CONN_MAX_AGE", 0, minimum=0))}
    except ValueError:
        raise SettingError("DATABASE_URL is not a database URL such as postgresql://user@host:5432/name") from None
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            # WAL and immediate transactions let concurrent ASGI requests write without
            # "database is locked" errors.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, channel layer, Celery -------------------------------------------------------
# Three roles, each its own Redis database in production: the cache may be cleared (FLUSHDB) or
# evicted at any time, the channel layer and the broker must not be (queued jobs would be lost).
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_URL = env_url("REDIS_URL", "", schemes=REDIS_SCHEMES)                        # cache, rate limits
CHANNEL_LAYER_URL = env_url("CHANNEL_LAYER_URL", REDIS_URL, schemes=REDIS_SCHEMES)  # WebSocket groups
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL or "memory://").strip()
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND",
                                       CELERY_BROKER_URL if REDIS_URL else "cache+memory://").strip()
if REDIS_URL and not DEBUG:
    for role, url in (("CHANNEL_LAYER_URL", CHANNEL_LAYER_URL), ("CELERY_BROKER_URL", CELERY_BROKER_URL)):
        if url.startswith(REDIS_SCHEMES) and redis_database(url) == redis_database(REDIS_URL):
            raise SettingError(f"{role} must name another Redis database than REDIS_URL (the cache, which may be "
                               "flushed or evicted), e.g. redis://host:6379/1")
REPLY_CACHE = "replies"  # the cache alias of cached replies (chat/response_cache.py), apart from counters and leases
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                # A Redis outage must degrade (no cache), never fail a request.
                "IGNORE_EXCEPTIONS": True,
                "SOCKET_CONNECT_TIMEOUT": 1,
                "SOCKET_TIMEOUT": 1,
            },
            "KEY_PREFIX": "llmsite",
        }
    }
    CACHES[REPLY_CACHE] = {**CACHES["default"], "KEY_PREFIX": "llmsite-replies"}
    DJANGO_REDIS_IGNORE_EXCEPTIONS = True
    DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS = True
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                    "CONFIG": {"hosts": [CHANNEL_LAYER_URL]}}
    }
else:
    # Counters, leases and stop flags must never be culled to make room (LocMem's default holds 300 entries and
    # drops a third when full): cached replies, which any client can add, live in a bounded store of their own.
    # Expired entries (past windows' counters) go before any live one is culled (llmsite/cache_backends.py).
    CACHES = {"default": {"BACKEND": "llmsite.cache_backends.SweepingLocMemCache", "LOCATION": "llmsite",
                          "OPTIONS": {"MAX_ENTRIES": 100_000}},
              REPLY_CACHE: {"BACKEND": "llmsite.cache_backends.SweepingLocMemCache", "LOCATION": "llmsite-replies",
                            "OPTIONS": {"MAX_ENTRIES": env_int("RESPONSE_CACHE_MAX_ENTRIES", 2000, minimum=1)}}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Without a broker, tasks run inline in the web process (the embedded default).
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A message unacknowledged this long (its worker died) is delivered again to another worker.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=1)}
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "llmsite")
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Workers log through LOGGING below (JSON lines with the request id), not Celery's own plain format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Auth, i18n, static ---------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Login throttling (django-axes, on every login page: /accounts/, /admin/, /api-auth/): LOGIN_FAILURE_LIMIT
# failed logins of one username from one client address lock that pair out (429) for
# LOGIN_LOCKOUT_MINUTES; other users, and the same user from elsewhere, can still log in. Password
# spraying (many usernames, a few tries each) locks the address out after LOGIN_ADDRESS_FAILURE_LIMIT
# failures of any usernames (llmsite/login_throttle.py gives each lockout its own limit). Attempts are
# rows in the database, so every instance sees them. Behind Nginx, run daphne with --proxy-headers
# --proxy-headers-host X-Real-IP so the client's address is the real one (deploy/README.md).
AUTHENTICATION_BACKENDS = ["llmsite.login_throttle.LoginThrottleBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
LOGIN_ADDRESS_FAILURE_LIMIT = env_int("LOGIN_ADDRESS_FAILURE_LIMIT", 50, minimum=1)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], ["ip_address"]]
AXES_HANDLER = "llmsite.login_throttle.LoginAttemptsHandler"
AXES_RESET_ON_SUCCESS = True
AXES_DISABLE_ACCESS_LOG = True  # failures only: a row per successful login would grow without end
AXES_VERBOSE = False  # no banner on every management command
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# Email: password-reset pages are routed only when mail can be sent (EMAIL_HOST or EMAIL_BACKEND set);
# without it a user with an address would get a 500 from the SMTP connection.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "webmaster@localhost")
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "")
PASSWORD_RESET_ENABLED = bool(EMAIL_BACKEND)
# Reset mails asked for from one client address, and for one email address, each (llmsite/password_reset_throttle.py).
PASSWORD_RESET_RATE_LIMIT = env_rate("PASSWORD_RESET_RATE_LIMIT", "5/hour")
EMAIL_BACKEND = EMAIL_BACKEND or "django.core.mail.backends.dummy.EmailBackend"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_URL = "media/"
# Avatars. With several instances this must be storage they all share (Nginx serves /media/ from it).
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", str(BASE_DIR / "media")))
RESOURCES_DIR = BASE_DIR / "resources"

# --- API ------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "chat.api.authentication.ApiKeyAuthentication",
        # The browsable API and the chat page use the login session.
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["chat.api.throttling.ApiKeyRateThrottle"],
    "DEFAULT_PARSER_CLASSES": ["chat.api.parsers.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer",
                                 "rest_framework.renderers.BrowsableAPIRenderer"],
    "EXCEPTION_HANDLER": "chat.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "chat.api.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
API_RATE_LIMIT = env_rate("API_RATE_LIMIT", "120/min")       # per key; empty = no limit
API_MAX_TOKENS = env_int("API_MAX_TOKENS", 2048, minimum=1)   # cap on max_tokens per request
API_MAX_MESSAGES = env_int("API_MAX_MESSAGES", 200, minimum=1)  # cap on messages per request
API_MAX_REQUEST_BYTES = env_int("API_MAX_REQUEST_BYTES", 1_000_000, minimum=1024)
# Any request body, before the application sees it (`manage.py serve`: chat/ops/raw_body.py): above an avatar's
# 8 MB in its upload form and a 5 MB card; a larger one gets a 413 and its connection closed without reading it.
REQUEST_MAX_BODY_BYTES = env_int("REQUEST_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=API_MAX_REQUEST_BYTES)
# WebSockets one user may hold open in one server process (0: no limit); each holds memory and a descriptor.
WS_MAX_CONNECTIONS_PER_USER = env_int("WS_MAX_CONNECTIONS_PER_USER", 16, minimum=0)
# Bytes of WebSocket frames one user's sockets may have parsed per second (chat/api/read_budget.py).
WS_READ_BYTES_PER_SECOND = env_int("WS_READ_BYTES_PER_SECOND", 65_536, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = max(API_MAX_REQUEST_BYTES, 2_621_440)
SSE_KEEPALIVE_SECONDS = env_float("SSE_KEEPALIVE_SECONDS", 10, minimum=0.1)
# A stream's text goes to its client at most every this many ms, tokens decoded meanwhile together (the first at
# once); 0: every token as it comes. Each write costs CPU on the cores that decode (docs/BENCHMARKS.md). Above a
# second a stream would fall silent long enough for proxies to give up on it (no keep-alive while text waits).
STREAM_INTERVAL_MS = env_float("STREAM_INTERVAL_MS", 20, minimum=0, maximum=1000)
# The event loop of `manage.py serve` (llmsite/event_loop.py): uvloop, or asyncio's own.
EVENT_LOOP = os.environ.get("EVENT_LOOP", "uvloop").strip()
if EVENT_LOOP not in EVENT_LOOPS:
    raise SettingError(f"EVENT_LOOP={EVENT_LOOP!r} is not one of {', '.join(EVENT_LOOPS)}")
# A conversation's reply whose client went away (page closed, socket lost) goes on this long, then is stopped
# and stored as far as it got (chat/trees/running.py); a request may ask for on_disconnect "cancel" instead.
REPLY_DETACHED_SECONDS = env_float("REPLY_DETACHED_SECONDS", 300, minimum=0)
# How many such replies one owner may leave running at once; past it, its oldest is stopped (as at the timeout).
REPLY_DETACHED_MAX_PER_OWNER = env_int("REPLY_DETACHED_MAX_PER_OWNER", 4, minimum=1)
# A stored conversation's tree: at most this many messages, and this many alternatives of one message (siblings:
# swipes, edits); a reply that would pass either is refused with 409 before anything is generated (chat/plans.py).
CONVERSATION_MAX_MESSAGES = env_int("CONVERSATION_MAX_MESSAGES", 5000, minimum=2)
CONVERSATION_MAX_ALTERNATIVES = env_int("CONVERSATION_MAX_ALTERNATIVES", 64, minimum=1)
# Stored conversations a user (every key acting as it) may own; 0 = no limit. Off by default like the quotas: one
# key may serve a whole application's end users.
USER_MAX_CONVERSATIONS = env_int("USER_MAX_CONVERSATIONS", 0, minimum=0)
# Quotas per API key (chat/tenancy/quotas.py): what a key whose own field is empty gets; 0 = no limit.
API_KEY_MAX_CONCURRENT = env_int("API_KEY_MAX_CONCURRENT", 0, minimum=0)        # generations at once
API_KEY_TOKENS_PER_MINUTE = env_int("API_KEY_TOKENS_PER_MINUTE", 0, minimum=0)  # prompt + completion tokens
API_KEY_TOKENS_PER_DAY = env_int("API_KEY_TOKENS_PER_DAY", 0, minimum=0)        # per UTC day

# Scenarios and World Info (docs/PROMPTS.md); the defaults are the ones scenarios/ falls back to.
SCENARIO_SCAN_DEPTH = env_int("SCENARIO_SCAN_DEPTH", 4, minimum=1)           # recent messages searched for keys
SCENARIO_TOKEN_BUDGET = env_int("SCENARIO_TOKEN_BUDGET", 400, minimum=0)     # tokens of World Info per prompt
SCENARIO_MAX_RECURSION = env_int("SCENARIO_MAX_RECURSION", 3, minimum=0)     # passes of entries firing entries
SCENARIO_BM25_THRESHOLD = env_float("SCENARIO_BM25_THRESHOLD", 0.3, minimum=0)  # the no-keyword fallback
WORLD_INFO_MAX_ENTRIES = env_int("WORLD_INFO_MAX_ENTRIES", 2000, minimum=1)  # entries of one imported file

# Deterministic replies (temperature 0 or a seed) answered from the cache; see chat/response_cache.py.
RESPONSE_CACHE_ENABLED = env_bool("RESPONSE_CACHE_ENABLED", True)
RESPONSE_CACHE_TTL = env_int("RESPONSE_CACHE_TTL", 3600, minimum=1)

# Background jobs (Celery): only requests with background=true (chat/jobs.py).
JOB_TTL_SECONDS = env_int("JOB_TTL_SECONDS", 24 * 3600, minimum=1)
# A running job whose worker has not written its heartbeat (every quarter of this) for this long
# has lost its worker: it is queued again, or failed after 3 attempts.
JOB_HEARTBEAT_TIMEOUT = env_int("JOB_HEARTBEAT_TIMEOUT", 60, minimum=1)
# Jobs one owner may have queued or running at once (0: no limit); the broker's queue is first come, first served.
API_MAX_ACTIVE_JOBS = env_int("API_MAX_ACTIVE_JOBS", 16, minimum=0)
SPECTACULAR_SETTINGS = {
    "TITLE": "llmsite API",
    "DESCRIPTION": "OpenAI-compatible chat completions with characters and scenarios.",
    "VERSION": "0.1.0",
    # Served by this site (drf-spectacular-sidecar), so the pages work offline and without a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # chat/api/urls.py: path segments any text may reach (a malformed id is its resource's 404), documented as
    # the ids they look up.
    "PATH_CONVERTER_OVERRIDES": {"lookup_uuid": {"type": "string", "format": "uuid"},
                                 "lookup_int": {"type": "integer"}},
    # The API's PATCH (a conversation's title) is not partial: its fields are required as for any request, not
    # all optional as a "Patched..." component would document them.
    "COMPONENT_SPLIT_PATCH": False,
}

# --- Production hardening (active when DEBUG is off) ------------------------------------------------
if not DEBUG:
    # The proxy in front (deploy/nginx.conf.template) tells the client's scheme: the one a TLS load
    # balancer before it sent, else its own. Without trusting it every request would look like
    # plain HTTP and the redirect to HTTPS would loop.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Probes and scrapers call each instance directly over the private network, in plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 60 * 60 * 24 * 30)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    SECURE_CONTENT_TYPE_NOSNIFF = True

# --- Logging --------------------------------------------------------------------------------------
# One JSON object per line (python-json-logger), each with the request id of the HTTP request,
# WebSocket connection or Celery task it belongs to (llmsite/log_context.py). LOG_FORMAT=plain
# gives readable lines for a terminal.
LOG_LEVEL = env_log_level("LOG_LEVEL", "INFO")
LOG_FORMAT = os.environ.get("LOG_FORMAT", "json").strip().lower()
if LOG_FORMAT not in ("json", "plain"):
    raise SettingError(f"LOG_FORMAT={LOG_FORMAT!r} is not json or plain")
# Prompts and replies stay out of the logs unless this is on (they may hold personal data).
LOG_PROMPTS = env_bool("LOG_PROMPTS", False)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "llmsite.log_context.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "pythonjsonlogger.json.JsonFormatter",
                 "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                 "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"}},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # Django's own per-request lines would duplicate llmsite.requests (one line per request).
    "loggers": {"django.request": {"level": "ERROR"}, "django.channels.server": {"level": "WARNING"}},
}

# /metrics: off, behind a bearer token (METRICS_TOKEN), or open without one only in DEBUG.
METRICS_ENABLED = env_bool("METRICS_ENABLED", True)
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
METRICS_OPEN_WITHOUT_TOKEN = DEBUG
# Celery workers count their generations too; WORKER_METRICS_PORT serves them (llmsite/celery.py).
WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0, minimum=0)
WORKER_METRICS_HOST = os.environ.get("WORKER_METRICS_HOST", "127.0.0.1")

# Named in an X-Served-By response header when set (several instances behind a load balancer).
INSTANCE_NAME = os.environ.get("INSTANCE_NAME", "")
# After SIGTERM, `manage.py serve` waits this many seconds at most for running replies (chat/ops/drain.py).
DRAIN_TIMEOUT = env_float("DRAIN_TIMEOUT", 30.0, minimum=0)
# After SIGTERM a Celery worker finishes its running job for this many seconds at most, then hands it back to the
# broker (another worker runs it again as its next attempt); 0 = wait for the job however long it runs.
WORKER_DRAIN_TIMEOUT = env_float("WORKER_DRAIN_TIMEOUT", 60.0, minimum=0)

# daphne serves the admin's static files itself unless a proxy (deploy/nginx.conf) does.
SERVE_STATIC = env_bool("SERVE_STATIC", True)
