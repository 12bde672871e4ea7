// The sms web page: plain JS against the /v1 contract of the node that served it (docs/api.md).
//
// Theory of operation. `state` holds everything the page knows; every change goes through a
// function that updates `state` and then re-renders the part of the page it touched. Messages
// arrive two ways, from history pages (GET .../messages) and from the WebSocket (/v1/events), and
// are merged by message_id, so a message seen both ways, or again after a reconnect, shows once.
// The WebSocket reconnects by itself with a growing pause; after each reconnect the open room's
// newest page is read again to fill whatever was missed while it was down.
// Presence, typing and read markers are optional: a node that does not have those routes answers
// 404/405 and the page stops asking and hides that part.
"use strict";

const TOKEN_KEY = "sms.session";
const PAGE = 50;
const TYPING_SHOWN_MS = 6000;     // a "typing" we heard of is shown this long unless refreshed
const TYPING_SEND_EVERY_MS = 3000; // while typing, tell the room at most this often
const ROOMS_EVERY_MS = 10000;      // membership has no event yet: re-read the room list this often

const state = {
  session: null,          // {token, user_id, name}
  rooms: new Map(),       // room_id -> {room_id, name, role, unread}
  current: null,          // room_id
  logs: new Map(),        // room_id -> {items: [msg], ids: Set, prev: cursor|null, loaded: bool}
  names: new Map(),       // user_id -> name, as far as we learned them
  online: new Map(),      // user_id -> status
  typing: new Map(),      // room_id -> Map(user_id -> expires_at_ms)
  members: new Map(),     // room_id -> [{user_id, name, role}], where the node lists them
  detailsAt: new Map(),   // room_id -> when we last read its members (ms)
  features: {presence: true, typing: true, read: true, details: true},
  ws: null,
  cursor: null,           // the last event's resume cursor, where the node gives one
  wsOpened: false,        // reconnects (not the first open) re-read what may have been missed
  wsConnects: 0,
  readsInFlight: 0,       // read markers sent and not yet answered
  unreadCounted: false,   // the counts from read markers are in
  wsRetryMs: 500,
  lastTypingSent: 0,
  timers: [],
};

const $ = (id) => document.getElementById(id);

// -- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  // A route this node does not have (as opposed to "no such room"): Starlette's plain 404/405.
  get missingRoute() {
    return this.status === 405 || (this.status === 404 && /^not found$/i.test(this.message));
  }
}

async function api(method, path, body) {
  const headers = {};
  if (state.session) headers["Authorization"] = "Bearer " + state.session.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    throw new ApiError(0, "network", "the node cannot be reached; is it running?");
  }
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const e = (data && data.error) || {};
    const err = new ApiError(res.status, e.code || "http_" + res.status, e.message || res.statusText);
    if (res.status === 401 && state.session && !path.startsWith("/v1/sessions")) {
      signOut("Your session has ended; please log in again.");
    }
    throw err;
  }
  return data;
}

const enc = encodeURIComponent;

// -- session -------------------------------------------------------------------------------------

async function logIn(name, password, register) {
  if (register) await api("POST", "/v1/users", {name, password});
  const s = await api("POST", "/v1/sessions", {name, password});
  state.session = {token: s.token, user_id: s.user_id, name};
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify(state.session));
  state.names.set(s.user_id, name);
  await start();
}

function signOut(reason) {
  const token = state.session && state.session.token;
  state.session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.rooms.clear(); state.logs.clear(); state.online.clear(); state.typing.clear();
  state.members.clear(); state.detailsAt.clear();
  state.current = null;
  state.wsOpened = false;
  state.cursor = null;
  state.unreadCounted = false;
  $("chat-view").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = reason || "";
  return token;
}

async function start() {
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  $("me-name").textContent = state.session.name;
  connect();
  await refreshRooms();
  if (!state.session) return;  // the saved token was no longer good
  const remembered = sessionStorage.getItem(TOKEN_KEY + ".room");
  if (remembered && state.rooms.has(remembered)) await openRoom(remembered);
  else if (!state.current && state.rooms.size) await openRoom(state.rooms.keys().next().value);
  announcePresence(document.hidden ? "away" : "online");
  loadUnread();
  state.timers.push(setInterval(() => { if (!document.hidden) refreshRooms(); }, ROOMS_EVERY_MS));
  state.timers.push(setInterval(renderTyping, 1000));
}

// -- rooms ---------------------------------------------------------------------------------------

async function refreshRooms() {
  if (!state.session) return;
  let data;
  try { data = await api("GET", "/v1/rooms"); } catch (err) { return notice(err); }
  const seen = new Set();
  for (const r of data.rooms) {
    seen.add(r.room_id);
    const known = state.rooms.get(r.room_id);
    // A room we were just added to may already have messages from the WebSocket: count those.
    const early = state.logs.has(r.room_id) ?
      state.logs.get(r.room_id).items.filter((m) => m.sender !== state.session.user_id).length : 0;
    const unread = typeof r.unread === "number" ? r.unread : (known ? known.unread : early);
    state.rooms.set(r.room_id, {room_id: r.room_id, name: r.name, role: r.role, unread});
  }
  for (const id of [...state.rooms.keys()]) if (!seen.has(id)) state.rooms.delete(id);
  if (state.current && !state.rooms.has(state.current)) state.current = null;
  renderRooms();
  renderRoomHeader();
}

async function createRoom(name) {
  const r = await api("POST", "/v1/rooms", {name});
  state.rooms.set(r.room_id, {room_id: r.room_id, name: r.name, role: "admin", unread: 0});
  await openRoom(r.room_id);
}

async function addMember(name, role) {
  const user = await api("GET", "/v1/users?name=" + enc(name));
  state.names.set(user.user_id, user.name);
  await api("PUT", `/v1/rooms/${enc(state.current)}/members/${enc(user.user_id)}`, {role});
  notice(`${user.name} is now ${role === "admin" ? "an admin" : "a member"} of ${state.rooms.get(state.current).name}.`);
}

async function openRoom(roomId) {
  state.current = roomId;
  sessionStorage.setItem(TOKEN_KEY + ".room", roomId);
  const room = state.rooms.get(roomId);
  if (room) room.unread = 0;
  renderRooms();
  renderRoomHeader();
  renderMessages();
  $("composer").disabled = false;
  $("composer").focus();
  if (!logOf(roomId).loaded) await loadNewest(roomId);
  markRead(roomId);
  loadDetails(roomId);
}

// Members with their names and roles, and whether they are online (where the node tells).
async function loadDetails(roomId) {
  state.detailsAt.set(roomId, Date.now());
  const room = await optional("details", "GET", `/v1/rooms/${enc(roomId)}`);
  if (!room || !Array.isArray(room.members)) return;
  state.members.set(roomId, room.members);
  for (const m of room.members) if (m.name) state.names.set(m.user_id, m.name);
  if (roomId === state.current) { renderMessages(); renderTyping(); }
  for (const m of room.members) {
    if (state.online.has(m.user_id) || !state.features.presence) continue;
    const p = await optional("presence", "GET", `/v1/users/${enc(m.user_id)}/presence`);
    if (p && p.status && p.status !== "offline") state.online.set(m.user_id, p.status);
  }
  renderOnline();
}

// Unread counts after a login: each room's newest page against our read marker in it.
async function loadUnread() {
  const data = await optional("read", "GET", "/v1/read-markers");
  if (!data || !data.markers) return;
  const rooms = [...state.rooms.values()].filter((r) => r.room_id !== state.current).slice(0, 20);
  for (const room of rooms) {
    const log = logOf(room.room_id);
    if (!log.loaded) {
      try {
        const page = await api("GET", `/v1/rooms/${enc(room.room_id)}/messages?limit=${PAGE}`);
        log.prev = page.prev;
        log.loaded = true;
        merge(room.room_id, page.messages);
      } catch (_) { continue; }
    }
    const marker = data.markers[room.room_id];
    const at = marker ? log.items.findIndex((m) => m.message_id === marker.message_id) : -1;
    if (marker) log.readUpTo = marker.message_id;
    room.unread = log.items.slice(at + 1).filter((m) => m.sender !== state.session.user_id).length;
  }
  renderRooms();
  state.unreadCounted = true;
}

// -- messages ------------------------------------------------------------------------------------

function logOf(roomId) {
  let log = state.logs.get(roomId);
  if (!log) state.logs.set(roomId, log = {items: [], ids: new Set(), prev: null, loaded: false});
  return log;
}

// Adds messages to a room's log, skipping ones it has. Returns how many were new.
function merge(roomId, messages) {
  const log = logOf(roomId);
  let added = 0;
  for (const m of messages) {
    if (log.ids.has(m.message_id)) continue;
    log.ids.add(m.message_id);
    // ts is a hybrid logical clock; JS numbers lose its low bits, so ties keep arrival order.
    let i = log.items.length;
    while (i > 0 && log.items[i - 1].ts > m.ts) i--;
    log.items.splice(i, 0, m);
    added++;
  }
  return added;
}

async function loadNewest(roomId) {
  let page;
  try { page = await api("GET", `/v1/rooms/${enc(roomId)}/messages?limit=${PAGE}`); } catch (err) { return notice(err); }
  const log = logOf(roomId);
  if (!log.loaded) log.prev = page.prev;
  log.loaded = true;
  merge(roomId, page.messages);
  if (roomId === state.current) renderMessages({stick: true});
}

async function loadOlder() {
  const roomId = state.current;
  const log = logOf(roomId);
  if (!log.prev || log.loadingOlder) return;
  log.loadingOlder = true;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const page = await api("GET", `/v1/rooms/${enc(roomId)}/messages?limit=${PAGE}&before=${enc(log.prev)}`);
    log.prev = page.prev;
    merge(roomId, page.messages);
    if (roomId === state.current) {
      renderMessages();
      box.scrollTop = box.scrollHeight - fromBottom; // keep what the reader was looking at in place
    }
  } catch (err) {
    notice(err);
  } finally {
    log.loadingOlder = false;
  }
}

async function send(body) {
  const roomId = state.current;
  const txn = crypto.randomUUID(); // one per message; a retry of this message would reuse it
  const r = await api("PUT", `/v1/rooms/${enc(roomId)}/messages/${enc(txn)}`, {body});
  const mine = {message_id: r.message_id, room_id: roomId, sender: state.session.user_id, body, ts: r.ts};
  if (merge(roomId, [mine]) && roomId === state.current) renderMessages({stick: true});
  if (state.lastTypingSent) optional("typing", "PUT", `/v1/rooms/${enc(roomId)}/typing`, {typing: false});
  state.lastTypingSent = 0;
  markRead(roomId);
}

// -- live events ---------------------------------------------------------------------------------

function connect() {
  if (!state.session) return;
  const sentCursor = state.cursor;
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
    "/v1/events?token=" + enc(state.session.token) + (sentCursor ? "&since=" + enc(sentCursor) : "");
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => {
    state.wsConnects += 1;
    state.wsRetryMs = 500;
    setStatus(true);
    if (state.wsOpened) {
      // Whatever was sent while we were away: read the open room's newest page again.
      if (state.current) loadNewest(state.current);
      refreshRooms();
    }
    state.wsOpened = true;
  };
  ws.onmessage = (ev) => {
    let event;
    try { event = JSON.parse(ev.data); } catch (_) { return; }
    if (event.cursor) state.cursor = event.cursor;
    onEvent(event);
  };
  ws.onclose = (ev) => {
    setStatus(false);
    if (state.ws !== ws || !state.session) return;
    if (ev.code === 1008 && sentCursor) {
      state.cursor = null;  // the node did not take our cursor: start afresh (history fills the gap)
    } else if (ev.code === 1008) {  // the node refused our token
      signOut("Your session has ended; please log in again.");
      return;
    }
    const wait = state.wsRetryMs;
    state.wsRetryMs = Math.min(state.wsRetryMs * 2, 10000);
    setTimeout(() => { if (state.ws === ws) connect(); }, wait);
  };
}

function onEvent(e) {
  switch (e.type) {
    case "message": return onMessage(e);
    case "presence": return onPresence(e);
    case "typing": return onTyping(e);
    case "read": return onRead(e);
    case "message_edited": return onEdited(e);
    case "message_deleted": return onDeleted(e);
    case "room_left":
    case "room_deleted": return onRoomGone(e);
    default: return; // newer nodes may send more kinds; ignore them
  }
}

function onMessage(e) {
  const msg = {message_id: e.message_id, room_id: e.room_id, sender: e.sender, body: e.body, ts: e.ts};
  if (e.sender_name) state.names.set(e.sender, e.sender_name);
  if (!state.rooms.has(e.room_id)) refreshRooms(); // we were just added to this room
  if (!state.names.has(e.sender) && Date.now() - (state.detailsAt.get(e.room_id) || 0) > 3000) {
    loadDetails(e.room_id); // a member we have not met yet: learn their name
  }
  const typing = state.typing.get(e.room_id);
  if (typing) typing.delete(e.sender);
  if (!merge(e.room_id, [msg])) return;
  const viewing = e.room_id === state.current && !document.hidden;
  if (e.room_id === state.current) renderMessages({stick: true});
  if (viewing) markRead(e.room_id);
  else if (e.sender !== state.session.user_id) {
    const room = state.rooms.get(e.room_id);
    if (room) room.unread += 1;
    renderRooms();
  }
  renderTyping();
}

function onPresence(e) {
  if (!e.user_id) return;
  if (e.name) state.names.set(e.user_id, e.name);
  const status = e.status || e.presence || "online";
  if (status === "offline") state.online.delete(e.user_id);
  else state.online.set(e.user_id, status);
  renderOnline();
}

function onTyping(e) {
  if (!e.room_id || !e.user_id || e.user_id === state.session.user_id) return;
  if (e.name) state.names.set(e.user_id, e.name);
  let room = state.typing.get(e.room_id);
  if (!room) state.typing.set(e.room_id, room = new Map());
  if (e.typing === false) room.delete(e.user_id);
  else room.set(e.user_id, Date.now() + (e.timeout_ms || TYPING_SHOWN_MS));
  renderTyping();
}

function onEdited(e) {
  const log = state.logs.get(e.room_id);
  const m = log && log.items.find((x) => x.message_id === e.message_id);
  if (!m) return;
  m.body = e.body;
  m.edited = true;
  if (e.room_id === state.current) renderMessages();
}

function onDeleted(e) {
  const log = state.logs.get(e.room_id);
  if (!log) return;
  const i = log.items.findIndex((x) => x.message_id === e.message_id);
  if (i < 0) return;
  log.items.splice(i, 1); // keep the id in log.ids so a late copy does not bring it back
  if (e.room_id === state.current) renderMessages();
}

function onRoomGone(e) {
  const room = state.rooms.get(e.room_id);
  state.rooms.delete(e.room_id);
  state.logs.delete(e.room_id);
  if (state.current === e.room_id) {
    state.current = null;
    renderMessages();
    renderRoomHeader();
    if (room) notice(e.type === "room_deleted" ? `${room.name} was deleted.` : `You are no longer in ${room.name}.`);
  }
  renderRooms();
}

function onRead(e) {
  // Our own marker, set from another tab or device: that room has been read.
  if (e.user_id === state.session.user_id && e.room_id !== state.current) {
    const room = state.rooms.get(e.room_id);
    if (room && room.unread) { room.unread = 0; renderRooms(); }
  }
}

// -- optional features (presence, typing, read markers) -------------------------------------------

// Calls a route that older nodes lack; returns its answer, or undefined if it failed or is missing.
async function optional(feature, method, path, body) {
  if (!state.features[feature] || !state.session) return undefined;
  try {
    return await api(method, path, body);
  } catch (err) {
    if (err.missingRoute) {
      state.features[feature] = false;
      if (feature === "presence") $("online-section").hidden = true;
    }
    return undefined;
  }
}

function announcePresence(status) {
  return optional("presence", "PUT", "/v1/presence", {status}).then((ok) => {
    if (ok && state.session) {
      if (status === "offline") state.online.delete(state.session.user_id);
      else state.online.set(state.session.user_id, status);
      renderOnline();
    }
  });
}

function markRead(roomId) {
  const log = logOf(roomId);
  const last = log.items[log.items.length - 1];
  if (!last) return;
  if (log.readUpTo === last.message_id) return;
  log.readUpTo = last.message_id;
  state.readsInFlight += 1;
  optional("read", "PUT", `/v1/rooms/${enc(roomId)}/read`, {message_id: last.message_id})
    .finally(() => { state.readsInFlight -= 1; });
}

function typed() {
  const now = Date.now();
  if (!state.current || now - state.lastTypingSent < TYPING_SEND_EVERY_MS) return;
  state.lastTypingSent = now;
  optional("typing", "PUT", `/v1/rooms/${enc(state.current)}/typing`, {typing: true});
}

// -- rendering -----------------------------------------------------------------------------------

function nameOf(userId) {
  return state.names.get(userId) || "user " + String(userId).slice(0, 8);
}

function setStatus(live) {
  const el = $("status");
  el.textContent = live ? "live" : "reconnecting";
  el.classList.toggle("live", live);
}

function notice(msgOrErr) {
  const el = $("notice");
  const isErr = msgOrErr instanceof Error;
  el.textContent = isErr ? hint(msgOrErr) : msgOrErr;
  el.classList.toggle("error", isErr);
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { el.textContent = ""; }, isErr ? 10000 : 5000);
}

function hint(err) {
  switch (err.status) {
    case 403: return err.message + " (only a room's admins can do that)";
    case 404: return err.message + " (check the spelling)";
    case 409: return err.message + " (pick another name)";
    case 413: return err.message + " (send it in smaller parts)";
    case 503: return err.message + " (the node will retry; try again shortly)";
    default: return err.message;
  }
}

function renderRooms() {
  const list = $("room-list");
  list.replaceChildren();
  const rooms = [...state.rooms.values()].sort((a, b) => a.name.localeCompare(b.name));
  for (const r of rooms) {
    const li = document.createElement("li");
    li.dataset.roomId = r.room_id;
    li.classList.toggle("active", r.room_id === state.current);
    const name = document.createElement("span");
    name.className = "room-name";
    name.textContent = "# " + r.name;
    if (r.role === "admin") {
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = "admin";
      name.append(role);
    }
    li.append(name);
    if (r.unread) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = r.unread > 99 ? "99+" : String(r.unread);
      li.append(badge);
    }
    li.addEventListener("click", () => openRoom(r.room_id));
    list.append(li);
  }
  const total = rooms.reduce((n, r) => n + r.unread, 0);
  document.title = total ? `(${total}) sms` : "sms";
}

function renderRoomHeader() {
  const room = state.current && state.rooms.get(state.current);
  $("room-title").textContent = room ? "# " + room.name : "Pick or create a room";
  $("add-member-form").hidden = !room || room.role !== "admin";
  $("composer").disabled = !room;
}

function renderMessages(opts = {}) {
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const list = $("message-list");
  list.replaceChildren();
  if (!state.current) { $("load-older").hidden = true; return; }
  const log = logOf(state.current);
  for (const m of log.items) {
    const li = document.createElement("li");
    li.className = "msg" + (m.sender === state.session.user_id ? " mine" : "");
    li.dataset.messageId = m.message_id;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = nameOf(m.sender);
    const when = document.createElement("time");
    const ms = Math.floor(m.ts / 65536);
    when.dateTime = new Date(ms).toISOString();
    when.textContent = new Date(ms).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = m.body;
    li.append(who, when);
    if (m.edited) {
      const edited = document.createElement("span");
      edited.className = "edited";
      edited.textContent = " (edited)";
      li.append(edited);
    }
    li.append(body);
    list.append(li);
  }
  $("load-older").hidden = !log.prev;
  if (opts.stick && atBottom || opts.stick === "always") box.scrollTop = box.scrollHeight;
  else if (opts.stick && log.items.length && log.items[log.items.length - 1].sender === state.session.user_id) {
    box.scrollTop = box.scrollHeight;
  }
}

function renderTyping() {
  const now = Date.now();
  const room = state.current && state.typing.get(state.current);
  const who = [];
  if (room) {
    for (const [user, until] of room) {
      if (until < now) room.delete(user);
      else who.push(nameOf(user));
    }
  }
  $("typing").textContent = who.length === 0 ? "" :
    who.length === 1 ? `${who[0]} is typing…` : `${who.slice(0, -1).join(", ")} and ${who.at(-1)} are typing…`;
}

function renderOnline() {
  if (!state.features.presence) return;
  $("online-section").hidden = state.online.size === 0;
  const list = $("online");
  list.replaceChildren();
  const people = [...state.online].map(([user, status]) => [nameOf(user), status]);
  people.sort((a, b) => a[0].localeCompare(b[0]));
  for (const [name, status] of people) {
    const li = document.createElement("li");
    li.className = status;
    li.textContent = name + (status !== "online" ? ` (${status})` : "");
    list.append(li);
  }
}

// -- wiring --------------------------------------------------------------------------------------

function wire() {
  let registering = false;
  $("register-btn").addEventListener("click", () => { registering = true; $("login-form").requestSubmit(); });
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const register = registering;
    registering = false;
    $("login-error").textContent = "";
    try {
      await logIn($("login-name").value.trim(), $("login-password").value, register);
      $("login-password").value = "";
    } catch (err) {
      $("login-error").textContent =
        err.status === 401 ? "Wrong name or password (new here? press Register)." :
        err.status === 409 ? "That name is taken; log in instead, or pick another." :
        err.message;
    }
  });
  $("logout-btn").addEventListener("click", async () => {
    await announcePresence("offline");
    const headers = {Authorization: "Bearer " + state.session.token};
    fetch("/v1/sessions/current", {method: "DELETE", headers}).catch(() => {});
    signOut("");
  });
  $("create-room-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("new-room-name");
    try { await createRoom(input.value.trim()); input.value = ""; } catch (err) { notice(err); }
  });
  $("add-member-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("member-name");
    try { await addMember(input.value.trim(), $("member-role").value); input.value = ""; } catch (err) { notice(err); }
  });
  $("composer").addEventListener("keydown", async (ev) => {
    if (ev.key !== "Enter" || ev.shiftKey || ev.isComposing) return;
    ev.preventDefault();
    const box = $("composer");
    const body = box.value;
    if (!body.trim() || !state.current) return;
    box.value = "";
    try { await send(body); } catch (err) { box.value = body; notice(err); }
  });
  $("composer").addEventListener("input", typed);
  $("load-older").addEventListener("click", loadOlder);
  $("messages").addEventListener("scroll", () => { if ($("messages").scrollTop < 20) loadOlder(); });
  document.addEventListener("visibilitychange", () => {
    if (!state.session) return;
    announcePresence(document.hidden ? "away" : "online");
    if (!document.hidden && state.current) markRead(state.current);
  });
}

wire();
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  try {
    state.session = JSON.parse(saved);
    state.names.set(state.session.user_id, state.session.name);
    start();
  } catch (_) {
    signOut("");
  }
} else {
  $("login-view").hidden = false;
}
