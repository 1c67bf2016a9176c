// The login page: user + password or a token; POST /api/login sets the session cookie
// (HttpOnly: this page never sees it), then back to where the operator came from.
import { $, getSession, header, postJSON, ApiError } from "./common.js";

function nextUrl() {
  const next = new URLSearchParams(location.search).get("next") || "/";
  // Only paths on this server: never an open redirect.
  return next.startsWith("/") && !next.startsWith("//") ? next : "/";
}

async function main() {
  await header("login");
  const session = await getSession();
  if (session.read_only) {
    // Nobody can log in to a server without credentials: say how to give it some.
    $("#login-error").hidden = false;
    $("#login-error").textContent =
      session.read_only_reason ||
      "This dashboard is read-only: it was started without credentials (edge-fleet serve --credentials FILE).";
    for (const el of document.querySelectorAll("#login-form input, #login-form button")) el.disabled = true;
    return;
  }
  if (session.logged_in) {
    $("#login-error").hidden = false;
    $("#login-error").className = "note";
    $("#login-error").textContent = `Already signed in as ${session.user}.`;
  }
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("#token").value;
    const body = token
      ? { token }
      : { user: $("#user").value.trim(), password: $("#password").value };
    const err = $("#login-error");
    err.hidden = true;
    $("#login-submit").disabled = true;
    try {
      await postJSON("/api/login", body);
      location.assign(nextUrl());
    } catch (e) {
      err.className = "message";
      err.hidden = false;
      if (e instanceof ApiError && e.status === 401) err.textContent = "Wrong user, password or token.";
      else if (e instanceof ApiError && e.status === 429) err.textContent = `Too many attempts: ${e.message}`;
      else err.textContent = e instanceof ApiError ? e.toString() : String(e);
    } finally {
      $("#login-submit").disabled = false;
    }
  });
}

main();
