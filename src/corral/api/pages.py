"""The few HTML pages a person sees: the device-login approval form."""

from __future__ import annotations

from html import escape

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem;color:#222}"
    "label{display:block;margin:.8rem 0 .2rem}input{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}"
    "button{margin-top:1.2rem;padding:.6rem 1.2rem;font-size:1rem}.error{color:#b00020}.code{font-family:monospace}"
)


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def activate(*, code: str = "", error: str | None = None) -> str:
    err = f"<p class=error role=alert>{escape(error)}</p>" if error else ""
    form = (
        "<p>Enter the code your device shows, and sign in to approve it. Approving signs that device in to "
        "<strong>your</strong> account with a new API key: approve only a code you started yourself.</p>"
        f"{err}<form method=post action=/activate>"
        f"<label for=code>Code</label><input id=code name=code class=code required "
        f"placeholder=ABCD-1234 value='{escape(code, quote=True)}'>"
        "<label for=email>Email</label><input id=email name=email type=email required autocomplete=username>"
        "<label for=password>Password</label>"
        "<input id=password name=password type=password required autocomplete=current-password>"
        "<button type=submit>Approve</button></form>"
    )
    return _page("Corral device login", form)


def approved(code: str) -> str:
    return _page(
        "Device approved",
        f"<p>The device showing <span class=code>{escape(code)}</span> is now signed in. "
        "You can close this page.</p>",
    )
