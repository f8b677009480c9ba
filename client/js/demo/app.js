// Switchboard demo chat: sign in, conversation list, one open conversation.
// Plain ES module, no build step, no dependencies beyond the browser client.
//
// Stable data-testid attributes (used by tests/browser; keep them stable):
//
//   Sign-in screen
//     signin                 the sign-in screen (hidden while signed in)
//     signin-form            the user-name form
//     signin-name            user name input
//     signin-submit          "Sign in" button
//     signin-jwt             <details> "sign in with a token (JWT) instead" (opened on a 404)
//     signin-token           JWT textarea
//     signin-token-submit    "Sign in with token" button
//     signin-error           error text (role=alert), e.g. "development tokens are off"
//   App
//     app                    the signed-in app
//     conn-state             connection state; text and data-state: connecting | connected |
//                            reconnecting | closed
//     current-user           the signed-in user id
//     signout-button         sign out
//     back-button            back to the list (narrow windows)
//     new-direct-user        user name for a new direct conversation
//     new-direct-submit      start it
//     new-group-toggle       <details> holding the group form
//     new-group-name         group name
//     new-group-members      comma-separated members
//     new-group-submit       create the group
//     new-conv-error         error from creating a conversation (role=alert)
//     conv-list              the conversation list (<ul>)
//     conv-empty             "No conversations yet"
//     conv-item-<id>         one conversation (button; aria-current="true" when open;
//                            data-conversation-id)
//     unread-<id>            its unread badge (text = count; hidden when 0; data-count)
//     presence-<user>        presence dot of a direct conversation's peer (data-online="true|false";
//                            title "online" or "last seen HH:MM")
//   Open conversation
//     chat-empty             placeholder shown while no conversation is open
//     chat-pane              the open conversation
//     conv-title             its title (peer or group name); conv-subtitle: presence / members
//     message-list           the scrolling log (role=log); data-conversation-id
//     history-top            "Loading older messages…" / "Beginning of the conversation"
//     message                a user message row: data-seq, data-sender, data-own="true|false";
//                            message-text inside holds the text
//     system-entry           a system entry row (created, added, removed, left): data-seq,
//                            data-sender
//     message-pending        an own message not yet acknowledged (no data-seq)
//     receipt-status         under the latest own message: "Sent", "Delivered", "Read by bob"
//                            (direct) or "Read by 2 of 3" (group); data-for-seq = that
//                            message's seq
//     typing-indicator       "alice is typing…" (hidden when nobody types)
//     composer               message textarea (Enter sends, Shift+Enter newline)
//     send-button            send
import { Switchboard } from '/switchboard.js';

const PAGE_SIZE = 50;
const TYPING_RENEW_MS = 3000;
const TYPING_DEFAULT_EXPIRY_MS = 5000;
const MARK_READ_INTERVAL_MS = 1000;
const SCROLL_LOAD_THRESHOLD_PX = 80;
const NEAR_BOTTOM_PX = 80;
const STORE_USER = 'switchboard.demo.user';
const STORE_TOKEN = 'switchboard.demo.token';

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

const byId = (id) => document.getElementById(id);

/** A 64-bit field as BigInt: the client converts them, but absent fields (protobuf JSON omits
 * defaults) are undefined. */
function big(v) {
  if (typeof v === 'bigint') return v;
  if (v === undefined || v === null || v === '') return 0n;
  try { return BigInt(v); } catch { return 0n; }
}
const maxBig = (a, b) => (a > b ? a : b);

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function pad2(n) { return String(n).padStart(2, '0'); }
function hhmm(ms) {
  const d = new Date(Number(ms));
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
}
function whenShort(ms) {
  const d = new Date(Number(ms));
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return hhmm(ms);
  return `${d.toLocaleDateString(undefined, { day: 'numeric', month: 'short' })} ${hhmm(ms)}`;
}

function errorText(err) {
  if (!err) return 'unknown error';
  const code = err.code ? String(err.code).replace(/^ERROR_CODE_/, '').toLowerCase().replace(/_/g, ' ') : '';
  const msg = err.message || String(err);
  return code && !msg.toLowerCase().includes(code) ? `${msg} (${code})` : msg;
}

const isDirectId = (id) => id.startsWith('dm:');
function peerOf(id, me) {
  const parts = id.split(':');
  if (parts.length !== 3) return null;
  return parts[1] === me ? parts[2] : parts[1];
}
function isDirectKind(kind, id) {
  return kind === 'CONVERSATION_KIND_DIRECT' || kind === 1 || (!kind && isDirectId(id));
}

function wsUrl() {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

/** @type {import('/switchboard.js').Switchboard | null} */
let client = null;
let me = null;
let ready = false;            // conversation list loaded; events before that are queued
let queued = [];
let session = 0;              // bumped on sign-out, so late callbacks of an old session do nothing

/** id -> { id, direct, peer, name, lastSeq, readSeq, unread, lastActivity, preview, memberCount } */
const convs = new Map();
/** id -> { li, button, avatar, nameEl, previewEl, timeEl, badge, dot } */
const convEls = new Map();
/** user -> { online, lastSeenMs } */
const presence = new Map();
const presenceSubscribed = new Set();

/** The open conversation, or null. */
let open = null;
let openGen = 0;

// ---------------------------------------------------------------------------
// Sign-in
// ---------------------------------------------------------------------------

const ui = {
  signin: byId('signin'),
  signinForm: byId('signin-form'),
  signinName: byId('signin-name'),
  signinJwt: byId('signin-jwt'),
  signinTokenForm: byId('signin-token-form'),
  signinToken: byId('signin-token'),
  signinError: byId('signin-error'),
  app: byId('app'),
  conn: byId('conn-state'),
  currentUser: byId('current-user'),
  signout: byId('signout-button'),
  back: byId('back-button'),
  newDirectForm: byId('new-direct-form'),
  newDirectUser: byId('new-direct-user'),
  newGroupForm: byId('new-group-form'),
  newGroupName: byId('new-group-name'),
  newGroupMembers: byId('new-group-members'),
  newConvError: byId('new-conv-error'),
  convList: byId('conv-list'),
  convEmpty: byId('conv-empty'),
  chatEmpty: byId('chat-empty'),
  chatPane: byId('chat-pane'),
  convTitle: byId('conv-title'),
  convSubtitle: byId('conv-subtitle'),
  messageList: byId('message-list'),
  historyTop: byId('history-top'),
  rows: byId('rows'),
  pendingRows: byId('pending-rows'),
  typing: byId('typing-indicator'),
  composerForm: byId('composer-form'),
  composer: byId('composer'),
};

function showSignin(message) {
  ui.app.hidden = true;
  ui.signin.hidden = false;
  setSigninError(message);
  ui.signinName.value = ui.signinName.value || sessionStorage.getItem(STORE_USER) || '';
  ui.signinName.focus();
}

function setSigninError(message) {
  ui.signinError.textContent = message || '';
  ui.signinError.hidden = !message;
}

function setBusy(form, busy) {
  for (const b of form.querySelectorAll('button')) b.disabled = busy;
}

ui.signinForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = ui.signinName.value.trim();
  if (!/^[A-Za-z0-9._@-]{1,64}$/.test(name)) {
    setSigninError('A user name is 1 to 64 letters, digits or . _ - @');
    ui.signinName.focus();
    return;
  }
  setSigninError('');
  setBusy(ui.signinForm, true);
  try {
    const res = await fetch('/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user: name }),
    });
    if (res.status === 404) {
      ui.signinJwt.open = true;
      setSigninError('Development tokens are off on this broker (POST /dev/token answered 404). '
        + 'Paste a token (JWT) issued for your user below.');
      ui.signinToken.focus();
      return;
    }
    if (!res.ok) {
      const body = (await res.text()).trim();
      setSigninError(`Could not get a token: ${body || res.status + ' ' + res.statusText}`);
      return;
    }
    const { user, token } = await res.json();
    await start(user, token);
  } catch (err) {
    setSigninError(`Could not reach the broker: ${errorText(err)}`);
  } finally {
    setBusy(ui.signinForm, false);
  }
});

ui.signinTokenForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const token = ui.signinToken.value.trim();
  if (!token) { setSigninError('Paste a token first.'); return; }
  setSigninError('');
  setBusy(ui.signinTokenForm, true);
  try {
    await start(null, token);
  } finally {
    setBusy(ui.signinTokenForm, false);
  }
});

ui.signout.addEventListener('click', () => signOut());

async function signOut(message) {
  sessionStorage.removeItem(STORE_TOKEN);
  session++;
  const c = client;
  resetState();
  showSignin(message);
  if (c) {
    try { await c.close(); } catch { /* already closed */ }
  }
}

function resetState() {
  client = null;
  me = null;
  ready = false;
  queued = [];
  convs.clear();
  convEls.clear();
  presence.clear();
  presenceSubscribed.clear();
  closeConversation();
  ui.convList.replaceChildren();
  ui.convEmpty.hidden = true;
  ui.currentUser.textContent = '';
  setConn('connecting');
}

// ---------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------

function setConn(stateName) {
  const labels = {
    connecting: 'connecting…',
    connected: 'connected',
    reconnecting: 'reconnecting…',
    closed: 'disconnected',
  };
  ui.conn.dataset.state = stateName;
  ui.conn.textContent = labels[stateName] || stateName;
}

/** Signs in with a token (user may be null for a pasted JWT) and shows the app. */
async function start(user, token) {
  const my = ++session;
  resetState();
  ui.signin.hidden = true;
  ui.app.hidden = false;
  ui.currentUser.textContent = user || '';
  setConn('connecting');
  let c;
  try {
    c = await Switchboard.connect({ url: wsUrl(), token });
  } catch (err) {
    if (my !== session) return;
    const auth = /UNAUTHENTICATED|AUTH/i.test(String(err && (err.code || err.message)));
    if (auth) sessionStorage.removeItem(STORE_TOKEN);
    showSignin(auth ? `The broker refused the token: ${errorText(err)}. Sign in again.`
      : `Could not connect: ${errorText(err)}`);
    return;
  }
  if (my !== session) { c.close().catch(() => {}); return; }
  client = c;
  me = c.userId || user;
  sessionStorage.setItem(STORE_USER, me);
  sessionStorage.setItem(STORE_TOKEN, token);
  ui.currentUser.textContent = me;
  ui.currentUser.title = `Signed in as ${me}`;
  setConn('connected');

  const on = (type, fn) => c.on(type, (ev) => {
    if (my !== session) return;
    if (!ready) { queued.push(() => fn(ev)); return; }
    try { fn(ev); } catch (err) { console.error(`demo: ${type} handler failed`, err); }
  });
  // Connection state is shown at once, whatever the list is doing.
  c.on('connected', (ev) => { if (my === session) onConnected(ev); });
  c.on('disconnected', () => { if (my === session) onDisconnected(); });
  c.on('closed', (ev) => {
    if (my !== session) return;
    const err = ev && ev.error;
    if (err && /UNAUTHENTICATED|AUTH/i.test(String(err.code || err.message))) {
      signOut(`The broker refused the token (${errorText(err)}). Sign in again.`);
      return;
    }
    setConn('closed');
  });
  on('message', onMessage);
  on('feed', onFeed);
  on('presence', onPresence);
  on('typing', onTyping);
  on('receipt', onReceipt);
  on('reset', onReset);
  on('revoked', ({ conversationId }) => removeConversation(conversationId, 'You are no longer a member of this conversation.'));

  try {
    await refreshConversations();
  } catch (err) {
    console.error('demo: listConversations failed', err);
  }
  if (my !== session) return;
  ready = true;
  const q = queued;
  queued = [];
  for (const fn of q) {
    try { fn(); } catch (err) { console.error('demo: queued event failed', err); }
  }
  subscribePeers();
}

function onConnected(ev) {
  setConn('connected');
  if (!ev || !ev.reconnect || !ready) return;
  // Back after a disconnection: missed messages arrive as 'message' events from the client's
  // sync; refresh what is not in the log (read state, presence subscriptions, receipts).
  presenceSubscribed.clear();
  refreshConversations().then(subscribePeers).catch(() => {});
  if (open) {
    loadReceipts(open).catch(() => {});
    scheduleMarkRead();
  }
}

function onDisconnected() {
  // The client reconnects by itself; a token refused for good ends in 'closed' (above).
  setConn('reconnecting');
  if (open) { for (const u of [...open.typing.keys()]) clearTyping(open, u); }
}

// ---------------------------------------------------------------------------
// Conversation list
// ---------------------------------------------------------------------------

async function refreshConversations() {
  const c = client;
  let after;
  for (let pages = 0; pages < 100; pages++) {
    const page = await c.listConversations(after ? { after } : {});
    if (c !== client) return;
    for (const s of page.conversations || []) mergeSummary(s);
    if (!page.hasMore || !page.nextAfter) break;
    after = page.nextAfter;
  }
  renderConvList();
}

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (client && ready) refreshConversations().then(subscribePeers).catch(() => {});
  }, 300);
}

function newConv(id, { kind, name } = {}) {
  const direct = isDirectKind(kind, id);
  return {
    id,
    direct,
    peer: direct ? peerOf(id, me) : null,
    name: name || '',
    lastSeq: 0n,
    readSeq: 0n,
    unread: 0,
    lastActivity: 0,
    preview: '',
    memberCount: 0,
  };
}

/** Merges a ConversationSummary: the one that has seen further in the log wins. */
function mergeSummary(s) {
  const id = s.conversationId;
  let c = convs.get(id);
  if (!c) { c = newConv(id, { kind: s.kind, name: s.name }); convs.set(id, c); }
  c.name = s.name || c.name;
  c.memberCount = Number(s.memberCount || c.memberCount || 0);
  const lastSeq = big(s.lastSeq);
  const readSeq = big(s.readSeq);
  c.lastActivity = Math.max(c.lastActivity, Number(big(s.lastActivityMs)));
  if (lastSeq >= c.lastSeq) {
    c.lastSeq = lastSeq;
    c.readSeq = maxBig(c.readSeq, readSeq);
    c.unread = c.readSeq >= lastSeq ? 0 : Number(big(s.unreadCount));
  } else {
    c.readSeq = maxBig(c.readSeq, readSeq);
  }
  if (isOpenAndVisible(id)) { c.unread = 0; scheduleMarkRead(); }
}

function convTitle(c) {
  if (c.direct) return c.peer || c.id;
  return c.name || c.id;
}

function sortedConvs() {
  return [...convs.values()].sort((a, b) => (b.lastActivity - a.lastActivity) || (a.id < b.id ? -1 : 1));
}

function convElements(c) {
  let e = convEls.get(c.id);
  if (e) return e;
  const initial = el('span', {});
  const avatar = el('span', { class: 'avatar' }, initial);
  const nameEl = el('span', { class: 'name' });
  const timeEl = el('span', { class: 'time' });
  const badge = el('span', { class: 'badge', 'data-testid': `unread-${c.id}`, hidden: true });
  const previewEl = el('span', { class: 'preview' });
  let dot = null;
  if (c.direct && c.peer) {
    dot = el('span', { class: 'presence', 'data-testid': `presence-${c.peer}`, role: 'img' });
    avatar.append(dot);
  }
  const button = el('button', {
    type: 'button',
    class: 'conv-item',
    'data-testid': `conv-item-${c.id}`,
    'data-conversation-id': c.id,
    onclick: () => openConversation(c.id),
  }, avatar, nameEl, timeEl, previewEl, badge);
  // The badge sits on the first row, the time is replaced by it when unread.
  const li = el('li', {}, button);
  e = { li, button, avatar, initial, nameEl, previewEl, timeEl, badge, dot };
  convEls.set(c.id, e);
  return e;
}

function renderConvItem(c) {
  const e = convElements(c);
  const title = convTitle(c);
  e.nameEl.textContent = title;
  e.initial.textContent = [...title][0] || '?';
  e.previewEl.textContent = c.preview || (c.direct ? 'Direct conversation' : `Group${c.memberCount ? ` · ${c.memberCount} members` : ''}`);
  e.timeEl.textContent = c.lastActivity ? whenShort(c.lastActivity) : '';
  e.timeEl.hidden = c.unread > 0;
  e.badge.textContent = String(c.unread);
  e.badge.dataset.count = String(c.unread);
  e.badge.hidden = c.unread <= 0;
  e.badge.setAttribute('aria-label', `${c.unread} unread`);
  e.button.classList.toggle('has-unread', c.unread > 0);
  e.button.setAttribute('aria-current', open && open.id === c.id ? 'true' : 'false');
  const p = c.peer ? presenceText(c.peer) : '';
  e.button.setAttribute('aria-label',
    `${title}${p ? `, ${p}` : ''}${c.unread > 0 ? `, ${c.unread} unread` : ''}`);
  if (e.dot) renderPresenceDot(e.dot, c.peer);
}

function renderConvList() {
  const list = sortedConvs();
  for (const c of list) renderConvItem(c);
  // Move only what is out of place, so a focused item keeps its focus when it does not move.
  list.forEach((c, i) => {
    const li = convEls.get(c.id).li;
    if (ui.convList.children[i] !== li) ui.convList.insertBefore(li, ui.convList.children[i] || null);
  });
  while (ui.convList.children.length > list.length) ui.convList.lastChild.remove();
  ui.convEmpty.hidden = list.length > 0;
  if (open) renderHeader();
}

function ensureConv(id, hints) {
  let c = convs.get(id);
  if (!c) {
    c = newConv(id, hints);
    convs.set(id, c);
    if (c.direct && c.peer) subscribePeers();
    refreshSoon();
  }
  return c;
}

function removeConversation(id, message) {
  convs.delete(id);
  const e = convEls.get(id);
  if (e) { e.li.remove(); convEls.delete(id); }
  if (open && open.id === id) closeConversation(message || 'This conversation was closed.');
  renderConvList();
}

// ---------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------

function presenceText(user) {
  const p = presence.get(user);
  if (!p) return '';
  if (p.online) return 'online';
  return p.lastSeenMs ? `last seen ${whenShort(p.lastSeenMs)}` : 'offline';
}

function renderPresenceDot(dot, user) {
  const p = presence.get(user);
  const online = !!(p && p.online);
  dot.dataset.online = String(online);
  const t = presenceText(user) || 'offline';
  dot.title = t;
  dot.setAttribute('aria-label', `${user}: ${t}`);
}

function applyPresence(p) {
  if (!p || !p.userId) return;
  presence.set(p.userId, { online: !!p.online, lastSeenMs: Number(big(p.lastSeenMs)) });
  for (const c of convs.values()) {
    if (c.peer === p.userId) renderConvItem(c);
  }
  if (open) renderHeader();
}

function subscribePeers() {
  const c = client;
  if (!c || !ready) return;
  const peers = [...new Set([...convs.values()].filter((x) => x.direct && x.peer).map((x) => x.peer))]
    .filter((u) => !presenceSubscribed.has(u));
  for (let i = 0; i < peers.length; i += 500) {
    const chunk = peers.slice(i, i + 500);
    for (const u of chunk) presenceSubscribed.add(u);
    c.subscribePresence(chunk).then((res) => {
      if (c !== client) return;
      const list = Array.isArray(res) ? res : (res && res.presences) || [];
      for (const p of list) applyPresence(p);
    }).catch((err) => {
      for (const u of chunk) presenceSubscribed.delete(u);
      console.warn('demo: subscribePresence failed', err);
    });
  }
}

function onPresence(p) { applyPresence(p); }

// ---------------------------------------------------------------------------
// Log entries
// ---------------------------------------------------------------------------

function messageText(m) {
  const ct = m.content || {};
  if (typeof ct.text === 'string') return ct.text;
  if (ct.data !== undefined) {
    const len = typeof ct.data === 'string' ? Math.floor(ct.data.length * 3 / 4) : (ct.data.length || 0);
    return `[${ct.contentType || 'data'}, ${len} bytes]`;
  }
  return '';
}

function list(users) {
  const u = users || [];
  if (u.length <= 1) return u.join('');
  return `${u.slice(0, -1).join(', ')} and ${u[u.length - 1]}`;
}

function systemText(m) {
  const s = m.system || {};
  const who = m.sender === me ? 'You' : m.sender;
  if (s.created) {
    const cr = s.created;
    if (isDirectKind(cr.kind, m.conversationId)) return `${who} started the conversation`;
    const others = (cr.members || []).filter((x) => x !== m.sender);
    return `${who} created the group${cr.name ? ` “${cr.name}”` : ''}${others.length ? ` with ${list(others)}` : ''}`;
  }
  if (s.membersAdded) return `${who} added ${list(s.membersAdded.users)}`;
  if (s.membersRemoved) return `${who} removed ${list(s.membersRemoved.users)}`;
  if (s.memberLeft) return `${s.memberLeft.user === me ? 'You' : (s.memberLeft.user || m.sender)} left`;
  return 'Conversation updated';
}

const isUserMessage = (m) => !m.system && !!m.content;

/** A log entry from the client (live, or synced after a reconnect), or built from an own ack. */
function onMessage(m) {
  const id = m.conversationId;
  const seq = big(m.seq);
  const c = ensureConv(id, {});
  const isNew = seq > c.lastSeq;
  if (isNew) {
    c.lastSeq = seq;
    c.lastActivity = Math.max(c.lastActivity, Number(big(m.timestampMs)) || Date.now());
    c.preview = isUserMessage(m)
      ? `${m.sender === me ? 'You: ' : (c.direct ? '' : `${m.sender}: `)}${messageText(m)}`
      : systemText(m);
    if (m.sender === me && isUserMessage(m)) {
      // An own message moves the own read watermark to it.
      c.readSeq = maxBig(c.readSeq, seq);
      c.unread = 0;
    } else if (isUserMessage(m) && seq > c.readSeq && !isOpenAndVisible(id)) {
      c.unread += 1;
    }
    if (m.system && !c.direct) {
      const s = m.system;
      if (s.created && s.created.name) c.name = s.created.name;
      if (s.membersAdded || s.membersRemoved || s.memberLeft) refreshSoon();
    }
  }
  renderSoon();
  if (open && open.id === id) {
    // Before the first history page is in, keep entries for after it.
    if (!open.loaded) { open.early.push(m); return; }
    showLive(open, m, isNew);
    // Marked read once shown (the mark covers the newest row shown).
    if (isNew && isUserMessage(m) && m.sender !== me && isOpenAndVisible(id)) scheduleMarkRead();
  }
}

/** Shows a live entry of the open conversation. Entries older than the oldest one shown (a
 * first sync replaying the log) are left to scrolling up. */
function showLive(o, m, isNew) {
  if (o.minSeq !== null && big(m.seq) < o.minSeq) return;
  const atBottom = nearBottom();
  insertRow(o, m);
  if (isUserMessage(m)) {
    clearTyping(o, m.sender);
    // A sender has read everything up to their own message (no receipt is pushed for it).
    const prev = o.receipts.get(m.sender) || { readSeq: 0n, deliveredSeq: 0n };
    const seq = big(m.seq);
    o.receipts.set(m.sender, { readSeq: maxBig(prev.readSeq, seq), deliveredSeq: maxBig(prev.deliveredSeq, seq) });
  }
  if (atBottom || m.sender === me) scrollToBottom();
  if (isNew && m.system && (m.system.membersAdded || m.system.membersRemoved || m.system.memberLeft)) {
    loadReceipts(o).catch(() => {});
  }
  renderReceipt(o);
}

/** Renders the conversation list once after the current burst of events. */
let renderQueued = false;
function renderSoon() {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(() => {
    renderQueued = false;
    renderConvList();
  });
}

function onFeed(e) {
  const id = e.conversationId;
  if (e.kind === 'FEED_EVENT_KIND_REMOVED') {
    if (convs.has(id)) removeConversation(id, 'You are no longer a member of this conversation.');
    return;
  }
  if (e.kind === 'FEED_EVENT_KIND_ADDED') {
    const c = ensureConv(id, { kind: e.conversationKind, name: e.conversationName });
    c.lastActivity = Math.max(c.lastActivity, Number(big(e.timestampMs)));
    renderSoon();
  }
}

function onReset({ conversationId }) {
  // The client dropped its local state for this conversation; reload what is shown.
  refreshSoon();
  if (open && open.id === conversationId) {
    const id = open.id;
    closeConversation();
    openConversation(id);
  }
}

// ---------------------------------------------------------------------------
// The open conversation
// ---------------------------------------------------------------------------

function isOpenAndVisible(id) {
  return !!open && open.id === id && document.visibilityState === 'visible';
}

/** Closes the open conversation; `message` replaces the placeholder text. */
function closeConversation(message) {
  if (open) {
    stopTyping(open);
    for (const t of open.typing.values()) clearTimeout(t.timer);
    clearTimeout(open.markTimer);
  }
  open = null;
  openGen++;
  ui.rows.replaceChildren();
  ui.pendingRows.replaceChildren();
  ui.historyTop.textContent = '';
  ui.typing.hidden = true;
  ui.typing.textContent = '';
  ui.chatPane.hidden = true;
  ui.chatEmpty.hidden = false;
  ui.chatEmpty.textContent = message || 'Select a conversation, or start a new one.';
  ui.app.classList.remove('conv-open');
  delete ui.messageList.dataset.conversationId;
  for (const e of convEls.values()) e.button.setAttribute('aria-current', 'false');
}

function renderHeader() {
  if (!open) return;
  const c = convs.get(open.id);
  if (!c) return;
  ui.convTitle.textContent = convTitle(c);
  let sub = '';
  if (c.direct) sub = presenceText(c.peer);
  else {
    const n = open.receipts.size || c.memberCount;
    sub = n ? `${n} members` : 'group';
  }
  ui.convSubtitle.textContent = sub;
}

async function openConversation(id) {
  if (!client) return;
  if (open && open.id === id) { ui.app.classList.add('conv-open'); ui.composer.focus(); return; }
  closeConversation();
  const gen = openGen;
  const c = convs.get(id) || ensureConv(id, {});
  open = {
    id,
    rows: new Map(),        // seq string -> row element
    minSeq: null,           // BigInt of the oldest row shown
    maxSeq: null,           // BigInt of the newest row shown
    latestOwn: null,        // { seq, row } of the newest own user message shown
    hasMore: false,
    loadingOlder: false,
    loaded: false,
    early: [],              // live entries that arrived before the first history page
    receipts: new Map(),    // user -> { readSeq, deliveredSeq }
    typing: new Map(),      // user -> { timer }
    markedSeq: 0n,
    lastMarkAt: 0,
    markTimer: null,
    typingSentAt: 0,
    typingActive: false,
    receiptEl: el('div', { class: 'receipt', 'data-testid': 'receipt-status', 'aria-live': 'polite' }),
  };
  const o = open;
  ui.messageList.dataset.conversationId = id;
  ui.chatEmpty.hidden = true;
  ui.chatPane.hidden = false;
  ui.app.classList.add('conv-open');
  ui.historyTop.textContent = 'Loading…';
  c.unread = 0;
  renderConvList();
  renderHeader();
  ui.composer.value = drafts.get(id) || '';
  autoGrow();
  if (window.matchMedia('(pointer: fine)').matches) ui.composer.focus();

  try {
    const page = await client.history(id, {}, PAGE_SIZE);
    if (gen !== openGen) return;
    for (const m of page.messages || []) insertRow(o, m);
    o.hasMore = !!page.hasMore && (page.messages || []).length > 0;
    o.loaded = true;
    for (const m of o.early.splice(0)) showLive(o, m, false);
    renderHistoryTop(o);
    scrollToBottom();
  } catch (err) {
    if (gen !== openGen) return;
    ui.historyTop.textContent = `Could not load messages: ${errorText(err)}`;
    return;
  }
  scheduleMarkRead();
  loadReceipts(o).catch((err) => console.warn('demo: receipts failed', err));
  fillViewport(o);
}

/** Loads older pages until the log can scroll (or there is nothing older). */
async function fillViewport(o) {
  for (let i = 0; i < 20 && open === o && o.hasMore; i++) {
    const lst = ui.messageList;
    if (lst.scrollHeight > lst.clientHeight + SCROLL_LOAD_THRESHOLD_PX) break;
    await loadOlder(o);
  }
}

function renderHistoryTop(o) {
  if (open !== o) return;
  if (o.loadingOlder) ui.historyTop.textContent = 'Loading older messages…';
  else if (o.hasMore) ui.historyTop.textContent = '';
  else ui.historyTop.textContent = 'Beginning of the conversation';
}

async function loadOlder(o) {
  if (o.loadingOlder || !o.hasMore || o.minSeq === null || !client) return;
  o.loadingOlder = true;
  renderHistoryTop(o);
  const gen = openGen;
  try {
    const page = await client.history(o.id, { before: o.minSeq }, PAGE_SIZE);
    if (gen !== openGen) return;
    const lst = ui.messageList;
    const prevHeight = lst.scrollHeight;
    const prevTop = lst.scrollTop;
    const msgs = page.messages || [];
    for (const m of msgs) insertRow(o, m);
    o.hasMore = !!page.hasMore && msgs.length > 0;
    // Keep what the user was looking at in place.
    lst.scrollTop = prevTop + (lst.scrollHeight - prevHeight);
  } catch (err) {
    if (gen === openGen) ui.historyTop.textContent = `Could not load older messages: ${errorText(err)}`;
    o.loadingOlder = false;
    return;
  }
  o.loadingOlder = false;
  renderHistoryTop(o);
}

ui.messageList.addEventListener('scroll', () => {
  if (open && open.loaded && ui.messageList.scrollTop < SCROLL_LOAD_THRESHOLD_PX) {
    loadOlder(open).then(() => { if (open) fillViewport(open); });
  }
  if (open && nearBottom()) scheduleMarkRead();
});

function nearBottom() {
  const l = ui.messageList;
  return l.scrollHeight - l.scrollTop - l.clientHeight < NEAR_BOTTOM_PX;
}
function scrollToBottom() {
  ui.messageList.scrollTop = ui.messageList.scrollHeight;
}

function buildRow(m) {
  const seq = big(m.seq);
  if (!isUserMessage(m)) {
    return el('div', {
      class: 'sys',
      'data-testid': 'system-entry',
      'data-seq': String(seq),
      'data-sender': m.sender || '',
    }, `${systemText(m)} · ${hhmm(big(m.timestampMs))}`);
  }
  const own = m.sender === me;
  const c = open && convs.get(open.id);
  const showSender = !own && c && !c.direct;
  const ts = Number(big(m.timestampMs));
  const time = el('time', { datetime: new Date(ts).toISOString(), title: new Date(ts).toLocaleString() }, hhmm(ts));
  const who = showSender ? `${m.sender} · ` : el('span', { class: 'visually-hidden' }, `${own ? 'You' : m.sender}, `);
  const meta = el('div', { class: 'meta' }, who, time);
  const bubble = el('div', { class: 'bubble', 'data-testid': 'message-text' }, messageText(m));
  const row = el('div', {
    class: `msg ${own ? 'own' : 'other'}`,
    'data-testid': 'message',
    'data-seq': String(seq),
    'data-sender': m.sender || '',
    'data-own': String(own),
  }, meta, bubble);
  return row;
}

/** Inserts a log entry in seq order; an entry already shown is ignored (history and live
 * messages overlap). */
function insertRow(o, m) {
  const seq = big(m.seq);
  const key = String(seq);
  if (seq <= 0n || o.rows.has(key)) return;
  const row = buildRow(m);
  o.rows.set(key, row);
  if (o.maxSeq === null || seq > o.maxSeq) {
    ui.rows.append(row);
    o.maxSeq = seq;
    if (o.minSeq === null) o.minSeq = seq;
  } else if (seq < o.minSeq) {
    ui.rows.prepend(row);
    o.minSeq = seq;
  } else {
    let before = null;
    for (const child of ui.rows.children) {
      if (child.dataset.seq && big(child.dataset.seq) > seq) { before = child; break; }
    }
    ui.rows.insertBefore(row, before);
  }
  if (isUserMessage(m) && m.sender === me && (!o.latestOwn || seq > o.latestOwn.seq)) {
    o.latestOwn = { seq, row };
    renderReceipt(o);
  }
}

// ---------------------------------------------------------------------------
// Sending and typing
// ---------------------------------------------------------------------------

const drafts = new Map();

function autoGrow() {
  const t = ui.composer;
  t.style.height = 'auto';
  t.style.height = `${Math.min(t.scrollHeight + 2, 160)}px`;
}

ui.composer.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
    ev.preventDefault();
    sendCurrent();
  }
});

ui.composer.addEventListener('input', () => {
  autoGrow();
  if (!open) return;
  drafts.set(open.id, ui.composer.value);
  if (ui.composer.value.trim() === '') { stopTyping(open); return; }
  const now = Date.now();
  if (!open.typingActive || now - open.typingSentAt >= TYPING_RENEW_MS) {
    open.typingActive = true;
    open.typingSentAt = now;
    client?.typing(open.id, true).catch(() => { /* never retried (protocol section 21) */ });
  }
});

ui.composer.addEventListener('blur', () => { if (open) stopTyping(open); });

function stopTyping(o) {
  if (!o.typingActive) return;
  o.typingActive = false;
  o.typingSentAt = 0;
  client?.typing(o.id, false).catch(() => {});
}

ui.composerForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  sendCurrent();
});

function sendCurrent() {
  if (!open || !client) return;
  const text = ui.composer.value;
  if (text.trim() === '') return;
  const o = open;
  const c = client;
  ui.composer.value = '';
  drafts.delete(o.id);
  autoGrow();
  stopTyping(o);
  const pending = el('div', { class: 'msg own pending', 'data-testid': 'message-pending' },
    el('div', { class: 'meta' }, 'sending…'),
    el('div', { class: 'bubble' }, text));
  ui.pendingRows.append(pending);
  scrollToBottom();
  c.send(o.id, text).then((ack) => {
    pending.remove();
    if (c !== client) return;
    // The client also emits the message built from this ack; rows are de-duplicated by seq.
    onMessage({
      conversationId: o.id,
      seq: big(ack.seq),
      sender: me,
      timestampMs: big(ack.timestampMs) || BigInt(Date.now()),
      clientMsgId: ack.clientMsgId,
      content: { text },
    });
  }).catch((err) => {
    pending.classList.add('failed');
    pending.querySelector('.meta').textContent = '';
    pending.append(el('span', { class: 'failed-note', role: 'alert' }, `Not sent: ${errorText(err)}`));
  });
}

function onTyping(t) {
  if (!t || t.userId === me || !open || open.id !== t.conversationId) return;
  const o = open;
  const prev = o.typing.get(t.userId);
  if (prev) clearTimeout(prev.timer);
  if (t.active) {
    const ms = Number(t.expiresInMs) || TYPING_DEFAULT_EXPIRY_MS;
    o.typing.set(t.userId, { timer: setTimeout(() => clearTyping(o, t.userId), ms) });
  } else {
    o.typing.delete(t.userId);
  }
  renderTyping(o);
}

function clearTyping(o, user) {
  const t = o.typing.get(user);
  if (!t) return;
  clearTimeout(t.timer);
  o.typing.delete(user);
  renderTyping(o);
}

function renderTyping(o) {
  if (open !== o) return;
  const users = [...o.typing.keys()];
  let text = '';
  if (users.length === 1) text = `${users[0]} is typing…`;
  else if (users.length === 2 || users.length === 3) text = `${list(users)} are typing…`;
  else if (users.length > 3) text = 'Several people are typing…';
  ui.typing.textContent = text;
  ui.typing.hidden = !text;
}

// ---------------------------------------------------------------------------
// Read receipts
// ---------------------------------------------------------------------------

async function loadReceipts(o) {
  const c = client;
  if (!c) return;
  const res = await c.receipts(o.id);
  if (open !== o || c !== client) return;
  const fresh = new Map();
  for (const r of res.receipts || []) {
    const prev = o.receipts.get(r.userId);
    fresh.set(r.userId, {
      readSeq: maxBig(big(r.readSeq), prev ? prev.readSeq : 0n),
      deliveredSeq: maxBig(big(r.deliveredSeq), prev ? prev.deliveredSeq : 0n),
    });
  }
  o.receipts = fresh;
  renderReceipt(o);
  renderHeader();
}

function onReceipt(r) {
  if (!r) return;
  const id = r.conversationId;
  if (r.userId === me) {
    // Read on another device (or a coalesced push of our own mark).
    const c = convs.get(id);
    if (c) {
      c.readSeq = maxBig(c.readSeq, big(r.readSeq));
      if (c.readSeq >= c.lastSeq && c.unread) { c.unread = 0; renderConvList(); }
    }
  }
  if (open && open.id === id) {
    const prev = open.receipts.get(r.userId) || { readSeq: 0n, deliveredSeq: 0n };
    open.receipts.set(r.userId, {
      readSeq: maxBig(prev.readSeq, big(r.readSeq)),
      deliveredSeq: maxBig(prev.deliveredSeq, big(r.deliveredSeq)),
    });
    renderReceipt(open);
  }
}

function renderReceipt(o) {
  if (open !== o) return;
  const r = o.receiptEl;
  if (!o.latestOwn) { r.remove(); return; }
  const s = o.latestOwn.seq;
  const c = convs.get(o.id);
  const others = [...o.receipts.entries()].filter(([u]) => u !== me);
  const readers = others.filter(([, w]) => w.readSeq >= s);
  const delivered = others.filter(([, w]) => maxBig(w.deliveredSeq, w.readSeq) >= s);
  let text;
  if (c && c.direct) {
    const peer = c.peer;
    if (readers.length > 0) text = `Read by ${peer}`;
    else if (delivered.length > 0) text = 'Delivered';
    else text = 'Sent';
  } else if (readers.length > 0) {
    text = `Read by ${readers.length} of ${others.length}`;
  } else if (delivered.length > 0) {
    text = `Delivered to ${delivered.length} of ${others.length}`;
  } else {
    text = 'Sent';
  }
  r.textContent = text;
  r.dataset.forSeq = String(s);
  r.title = readers.length ? `Read by ${readers.map(([u]) => u).join(', ')}` : '';
  const row = o.latestOwn.row;
  if (r.previousSibling !== row || r.parentNode !== row.parentNode) row.after(r);
}

/** Marks the newest shown entry read, at most once a second, while the conversation is open
 * and the page visible. */
function scheduleMarkRead() {
  const o = open;
  if (!o || !o.loaded || !client || document.visibilityState !== 'visible') return;
  if (o.maxSeq === null || o.maxSeq <= o.markedSeq) return;
  const wait = o.lastMarkAt + MARK_READ_INTERVAL_MS - Date.now();
  if (wait > 0) {
    if (!o.markTimer) o.markTimer = setTimeout(() => { o.markTimer = null; scheduleMarkRead(); }, wait);
    return;
  }
  const seq = o.maxSeq;
  o.markedSeq = seq;
  o.lastMarkAt = Date.now();
  const conv = convs.get(o.id);
  if (conv) {
    conv.readSeq = maxBig(conv.readSeq, seq);
    if (conv.unread) { conv.unread = 0; renderConvList(); }
  }
  client.markRead(o.id, seq).catch((err) => {
    // Send the latest watermark again later (e.g. after RATE_LIMITED or a reconnect).
    if (open === o) {
      o.markedSeq = 0n;
      const retry = Math.max(Number(err && err.retryAfterMs) || 0, MARK_READ_INTERVAL_MS);
      clearTimeout(o.markTimer);
      o.markTimer = setTimeout(() => { o.markTimer = null; scheduleMarkRead(); }, retry);
    }
  });
}

// Leaving the page: send a mark that is still waiting for its one-second slot (best effort).
window.addEventListener('pagehide', () => {
  const o = open;
  if (!o || !client || !o.loaded || o.maxSeq === null || o.maxSeq <= o.markedSeq) return;
  o.markedSeq = o.maxSeq;
  client.markRead(o.id, o.maxSeq).catch(() => {});
});

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && open) {
    const c = convs.get(open.id);
    if (c && c.unread) { c.unread = 0; renderConvList(); }
    scheduleMarkRead();
  } else if (open) {
    stopTyping(open);
  }
});

// ---------------------------------------------------------------------------
// Creating conversations
// ---------------------------------------------------------------------------

function setNewConvError(msg) {
  ui.newConvError.textContent = msg || '';
  ui.newConvError.hidden = !msg;
}

ui.newDirectForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  if (!client) return;
  const user = ui.newDirectUser.value.trim();
  if (!/^[A-Za-z0-9._@-]{1,64}$/.test(user)) { setNewConvError('Enter a valid user name.'); return; }
  if (user === me) { setNewConvError('You cannot start a direct conversation with yourself.'); return; }
  setNewConvError('');
  setBusy(ui.newDirectForm, true);
  try {
    const conv = await client.createDirect(user);
    const c = ensureConv(conv.conversationId, { kind: conv.kind || 'CONVERSATION_KIND_DIRECT' });
    c.lastActivity = Math.max(c.lastActivity, Number(big(conv.createdAtMs)) || Date.now());
    ui.newDirectUser.value = '';
    renderConvList();
    openConversation(conv.conversationId);
  } catch (err) {
    setNewConvError(`Could not start the conversation: ${errorText(err)}`);
  } finally {
    setBusy(ui.newDirectForm, false);
  }
});

ui.newGroupForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  if (!client) return;
  const name = ui.newGroupName.value.trim();
  const members = [...new Set(ui.newGroupMembers.value.split(',').map((s) => s.trim()).filter(Boolean))]
    .filter((u) => u !== me);
  if (!name) { setNewConvError('Give the group a name.'); return; }
  const bad = members.find((u) => !/^[A-Za-z0-9._@-]{1,64}$/.test(u));
  if (bad) { setNewConvError(`Not a valid user name: ${bad}`); return; }
  setNewConvError('');
  setBusy(ui.newGroupForm, true);
  try {
    const conv = await client.createGroup(name, members, { visibility: 'shared' });
    const c = ensureConv(conv.conversationId, { kind: 'CONVERSATION_KIND_GROUP', name: conv.name || name });
    c.name = conv.name || name;
    c.memberCount = Number(conv.memberCount || members.length + 1);
    c.lastActivity = Math.max(c.lastActivity, Number(big(conv.createdAtMs)) || Date.now());
    ui.newGroupName.value = '';
    ui.newGroupMembers.value = '';
    ui.newGroupForm.closest('details').open = false;
    renderConvList();
    openConversation(conv.conversationId);
  } catch (err) {
    setNewConvError(`Could not create the group: ${errorText(err)}`);
  } finally {
    setBusy(ui.newGroupForm, false);
  }
});

ui.back.addEventListener('click', () => {
  const id = open && open.id;
  closeConversation();
  renderConvList();
  if (id) convEls.get(id)?.button.focus();
});

// ---------------------------------------------------------------------------
// Boot
// ---------------------------------------------------------------------------

const storedToken = sessionStorage.getItem(STORE_TOKEN);
if (storedToken) {
  start(sessionStorage.getItem(STORE_USER), storedToken);
} else {
  showSignin();
}
