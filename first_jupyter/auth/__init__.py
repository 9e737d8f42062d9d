"""The user's Globus identity, for the server side of the gateway only.

Tokens come from sources tried in a configured order (``sources``), are refreshed when they can be
(``manager``), and never leave the server: not to the browser, not to kernels, not into a log line or an error.
"""
