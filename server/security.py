"""Security headers on every response, and no POSTs from other websites."""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, abort, current_app, request
from flask_talisman import Talisman

# Inline <style>/<script> carry a per-response nonce; nothing is loaded from elsewhere.
CSP = {"default-src": "'self'", "img-src": "'self' data:", "style-src": "'self'", "script-src": "'self'",
       "object-src": "'none'", "base-uri": "'none'", "form-action": "'self'", "frame-ancestors": "'none'"}


def init_app(app: Flask) -> None:
    # "no-referrer" would make browsers send "Origin: null" on the form's own POST.
    Talisman(app, force_https=False, strict_transport_security=False, session_cookie_secure=False,
             content_security_policy=CSP, content_security_policy_nonce_in=["script-src", "style-src"],
             frame_options="DENY", referrer_policy="same-origin")
    app.before_request(refuse_cross_site_posts)
    app.after_request(no_store)


def same_origin(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "http://[" (an unclosed IPv6 literal): not this site
        return False
    return parts.netloc == request.host or f"{parts.scheme}://{parts.netloc}" in current_app.config["TRUSTED_ORIGINS"]


def refuse_cross_site_posts():
    """A form on another site must not be able to post to this server (OWASP: verify the
    Origin, else the Referer; clients that send neither, like curl, are not browsers)."""
    if request.method != "POST":
        return None
    origin, referer = request.headers.get("Origin"), request.headers.get("Referer")
    cross = request.headers.get("Sec-Fetch-Site") == "cross-site" or origin == "null"
    if cross or (origin and not same_origin(origin)) or (not origin and referer and not same_origin(referer)):
        abort(403, "requests from other websites are not accepted")
    return None


def no_store(response):
    """Results describe a patient's image: no cache may keep them."""
    response.headers["Cache-Control"] = "no-store"
    return response
