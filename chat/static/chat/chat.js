// The chat page: characters, past conversations, and replies streamed over the WebSocket. A conversation is a
// tree: each message may have alternatives (‹ n / m ›); replies can be regenerated, continued, stopped and
// deleted, user messages edited (a new branch). Keyboard: ←/→ on a message switch its alternatives, Escape stops.
(() => {
  "use strict";
  const characters = JSON.parse(document.getElementById("characters-data").textContent);
  // Group chats: picked like a character; each reply names (and shows) the member who speaks.
  const groupsNode = document.getElementById("groups-data");
  const groups = groupsNode ? JSON.parse(groupsNode.textContent) : [];
  const usernameNode = document.getElementById("username-data");
  const el = (id) => document.getElementById(id);
  // greeting: position in character.greetings of the greeting shown; sent with a new conversation's first message.
  const state = { character: null, conversation: null, socket: null, replyNode: null, busy: false, greeting: 0,
                  greetingNode: null, username: usernameNode ? JSON.parse(usernameNode.textContent) : "",
                  path: [], pending: null };

  const FRIENDLY = {
    model_unavailable: "The model is unavailable right now. Please try again later.",
    rate_limit_exceeded: "You are sending messages too quickly. Wait a moment and try again.",
    context_length_exceeded: "This conversation has grown too long for the model. Start a new conversation.",
    character_not_found: "This character is no longer available.",
    conversation_not_found: "This conversation no longer exists. Start a new one.",
    conversation_busy: "A reply is still being written for this conversation. Wait for it, or stop it.",
  };

  function friendlyError(event) {
    const error = event.error || {};
    return FRIENDLY[error.code] || error.message || "Something went wrong. Please try again.";
  }

  function setStatus(text, isError) {
    const status = el("status");
    status.textContent = text || "";
    status.classList.toggle("error", Boolean(isError));
  }

  function speakerOf(slug) {
    return (state.character && state.character.members || []).find((m) => m.slug === slug) || null;
  }

  function setSpeaker(item, speaker) {
    if (!speaker) return;
    item.dataset.speaker = speaker.slug;
    item.querySelector(".who").textContent = speaker.name;
    if (speaker.avatar) {
      const img = document.createElement("img");
      img.className = "avatar";
      img.src = speaker.avatar;
      img.alt = "";
      item.querySelector(".who").prepend(img);
    }
  }

  function button(label, onClick, options = {}) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = options.className || "tool";
    if (options.ariaLabel) b.setAttribute("aria-label", options.ariaLabel);
    if (options.disabled) { b.disabled = true; b.dataset.off = "true"; }
    b.addEventListener("click", onClick);
    return b;
  }

  function addMessage(role, text, name) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? (name || "You") : name || state.character.name;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    el("messages").append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function noteScenarios(item, scenarios) {
    if (!scenarios || !scenarios.length) return;
    const note = document.createElement("p");
    note.className = "scenarios";
    note.textContent = "Scenario: " + scenarios.map((s) => s.reason ? `${s.title} (${s.reason})` : s.title).join("; ");
    item.append(note);
  }

  // --- the active path, with each message's alternatives and actions ---------------------------------------

  function renderPath(body, completed) {
    state.path = body.messages;
    state.greetingNode = null;
    el("messages").replaceChildren();
    body.messages.forEach((message, position) => {
      const mine = !message.author || message.author === state.username;  // group chats: other humans by name
      const item = addMessage(message.role, message.content, message.role === "user" && !mine ? message.author : undefined);
      item.dataset.id = message.id;
      if (message.role === "assistant") { setSpeaker(item, speakerOf(message.speaker)); noteScenarios(item, message.scenarios); }
      if (completed && completed.includes(message.id)) item.dataset.complete = "true";
      if (message.stopped) {
        const note = document.createElement("p");
        note.className = "stopped-note";
        note.textContent = "Stopped";
        item.append(note);
        item.dataset.stopped = "true";
      }
      item.append(messageTools(message, position === body.messages.length - 1, position));
    });
  }

  function messageTools(message, isLast, position) {
    const tools = document.createElement("div");
    tools.className = "tools";
    const alternatives = message.alternatives;
    if (alternatives && alternatives.count > 1) {
      const nav = document.createElement("span");
      nav.className = "alternatives";
      nav.setAttribute("role", "group");
      nav.setAttribute("aria-label", "Alternatives");
      const previous = alternatives.ids[alternatives.index - 1], next = alternatives.ids[alternatives.index + 1];
      nav.append(button("‹", () => send({ type: "select", message: previous }),
                        { ariaLabel: "Previous alternative", disabled: previous === undefined }));
      const counter = document.createElement("span");
      counter.className = "counter";
      counter.textContent = `${alternatives.index + 1} / ${alternatives.count}`;
      nav.append(counter);
      nav.append(button("›", () => send({ type: "select", message: next }),
                        { ariaLabel: "Next alternative", disabled: next === undefined }));
      tools.append(nav);
    }
    const previousMessage = state.path[position - 1];
    if (message.role === "assistant" && previousMessage && previousMessage.role === "user") {
      tools.append(button("Regenerate", () => operate({ type: "regenerate", message: message.id })));
    }
    if (message.role === "assistant" && isLast) {
      tools.append(button("Continue", () => operate({ type: "continue", message: message.id })));
    }
    if (message.role === "user") tools.append(button("Edit", () => startEdit(message)));
    tools.append(button("Delete", () => send({ type: "delete", message: message.id }),
                        { ariaLabel: "Delete message", className: "tool danger" }));
    return tools;
  }

  function nodeOf(id) {
    return el("messages").querySelector(`.message[data-id="${id}"]`);
  }

  function startEdit(message) {
    const item = nodeOf(message.id);
    if (!item || state.busy || item.querySelector("textarea")) return;
    const form = document.createElement("form");
    form.className = "edit";
    const label = document.createElement("label");
    label.className = "visually-hidden";
    label.textContent = "Edit message";
    const area = document.createElement("textarea");
    area.value = message.content;
    area.rows = 3;
    area.id = `edit-${message.id}`;
    label.htmlFor = area.id;
    const save = button("Save", () => form.requestSubmit());
    const cancel = button("Cancel", () => renderPath({ messages: state.path }));
    form.append(label, area, save, cancel);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = area.value.trim();
      if (!text) return;
      if (operate({ type: "edit", message: message.id, content: text })) {
        item.querySelector(".text").textContent = text;
        form.remove();
      }
    });
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
      if (event.key === "Escape") { event.preventDefault(); cancel.click(); }
    });
    item.querySelector(".text").after(form);
    area.focus();
  }

  // --- the socket ------------------------------------------------------------------------------------------

  function send(message) {
    if (!state.socket || state.socket.readyState !== WebSocket.OPEN) {
      setStatus("Not connected. Reconnecting…", true);
      return false;
    }
    if (state.conversation && !message.conversation) message.conversation = state.conversation;
    state.socket.send(JSON.stringify(message));
    return true;
  }

  function operate(message) {
    if (state.busy) return false;
    state.pending = message;
    if (!send(message)) return false;
    setBusy(true);
    setStatus("Sending…");
    return true;
  }

  function remember() {
    const params = new URLSearchParams();
    if (state.character) params.set("character", state.character.slug);
    if (state.conversation) params.set("conversation", state.conversation);
    history.replaceState(null, "", "?" + params.toString());
  }

  function socketOpen() {
    return !!state.socket && state.socket.readyState === WebSocket.OPEN;
  }

  function setBusy(busy) {
    state.busy = busy;
    // Nothing can be sent before the socket is open (a message sent then would be lost).
    el("send").disabled = busy || !state.character || !socketOpen();
    el("stop").hidden = !busy;
    el("message-input").disabled = !state.character;
    document.querySelectorAll(".tools button").forEach((b) => { b.disabled = busy || b.dataset.off === "true"; });
    // Not while a reply is written: the server refuses its conversation's (409), and that error, like any, would
    // end the reply on this page (its text removed, Send enabled again) while it goes on.
    document.querySelectorAll(".delete-conversation").forEach((b) => { b.disabled = busy; });
  }

  function connect() {
    if (state.socket) { state.socket.onclose = null; state.socket.close(); }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const slug = state.character.slug;
    const socket = new WebSocket(`${scheme}://${location.host}/ws/chat/${slug}/`);
    socket.onmessage = (message) => handleEvent(JSON.parse(message.data));
    socket.onclose = () => {
      // The reply goes on without us (the server keeps it); reconnect and follow it again.
      if (state.socket !== socket || !state.character || state.character.slug !== slug) return;
      setBusy(state.busy);
      setStatus("The connection was lost. Reconnecting…", true);
      setTimeout(() => { if (state.socket === socket) connect().then(attach).catch(() => {}); }, 1000);
    };
    state.socket = socket;
    return new Promise((resolve, reject) => {
      socket.onopen = () => { setBusy(state.busy); resolve(); };
      socket.onerror = () => reject(new Error("WebSocket failed"));
    });
  }

  function attach() {
    if (state.conversation) send({ type: "attach", conversation: state.conversation });
  }

  function streamTarget(event) {
    if (event.kind === "continue") {
      const node = nodeOf(event.message);
      if (node) {
        node.setAttribute("aria-busy", "true");
        return node;
      }
    }
    // A new reply: what the page showed after its parent is replaced by the new user message (if any) and it.
    const parent = event.parent != null ? nodeOf(event.parent) : null;
    if (parent) {
      while (parent.nextElementSibling) parent.nextElementSibling.remove();
      if (event.user) addMessage("user", event.user);
    } else if (event.kind !== "reply" || event.resumed) {
      el("messages").replaceChildren();
      if (event.user) addMessage("user", event.user);
    }  // else: a new conversation's first reply, its greeting and message already shown
    const node = addMessage("assistant", "");
    node.setAttribute("aria-busy", "true");
    return node;
  }

  // A text node per piece: `textContent +=` would copy the whole reply on every token (quadratic in long replies).
  function appendText(node, text) {
    if (text) node.querySelector(".text").append(text);
  }

  function handleEvent(event) {
    if (event.type === "start") {
      setBusy(true);
      document.querySelectorAll(".message[data-complete]").forEach((node) => { delete node.dataset.complete; });
      state.replyNode = streamTarget(event);
      appendText(state.replyNode, (event.text && event.text[0]) || "");
      setSpeaker(state.replyNode, event.speaker);
      setStatus(`${event.speaker ? event.speaker.name : state.character.name} is typing…`);
    } else if (event.type === "token") {
      if (!state.replyNode || event.index) return;  // the tail of an abandoned reply; other choices not shown
      appendText(state.replyNode, event.text);
    } else if (event.type === "end") {
      state.replyNode = null;
      state.pending = null;
      if (event.conversation) state.conversation = event.conversation;
      remember();
      setStatus(event.stopped ? "Stopped." : "");
      setBusy(false);
      loadPath((event.messages || []).map((m) => m.id));
      loadConversations();
    } else if (event.type === "path") {
      renderPath(event);
      setBusy(state.busy);
    } else if (event.type === "error") {
      if (state.replyNode && !state.replyNode.dataset.complete && !state.replyNode.dataset.id) state.replyNode.remove();
      state.replyNode = null;
      state.pending = null;
      setStatus(friendlyError(event), true);
      setBusy(false);
      if (state.conversation) loadPath();
    } else if (event.type === "conversation_deleted") {
      if (event.conversation === state.conversation) newConversation(); else loadConversations();
      setStatus("Conversation deleted.");
    } else if (event.type === "idle") {
      setStatus("");
      // A reply may have ended between the page's path request and this attach: show what is stored now.
      if (state.conversation && !state.replyNode) loadPath().catch(() => {});
    }
  }

  async function api(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) throw new Error((await response.json()).error?.message || response.statusText);
    return response.json();
  }

  async function loadPath(completed) {
    if (!state.conversation) return;
    const body = await api(`/v1/conversations/${state.conversation}/path/`);
    if (state.replyNode) return;  // a reply started meanwhile: its end loads the path again
    renderPath(body, completed);
    setBusy(state.busy);
    return body;
  }

  async function loadConversations() {
    const list = el("conversations");
    list.replaceChildren();
    if (!state.character) return;
    const filter = state.character.group ? "group" : "character";
    const page = await api(`/v1/conversations/?${filter}=${encodeURIComponent(state.character.slug)}`);
    for (const conversation of page.results) {
      const item = document.createElement("li");
      const entry = document.createElement("button");
      entry.type = "button";
      entry.textContent = conversation.title || "Untitled chat";
      entry.setAttribute("aria-current", String(conversation.id === state.conversation));
      entry.addEventListener("click", () => openConversation(conversation.id).then(attach));
      const title = conversation.title || "Untitled chat";
      const remove = button("Delete", () => deleteConversation(conversation.id, title),
                            { className: "delete-conversation", ariaLabel: `Delete conversation: ${title}` });
      remove.disabled = state.busy;
      item.append(entry, remove);
      list.append(item);
    }
  }

  function deleteConversation(id, title) {
    if (!window.confirm(`Delete the conversation "${title}" and all its messages?`) || state.busy) return;
    send({ type: "delete_conversation", conversation: id });
  }

  async function openConversation(id) {
    state.conversation = id;
    state.replyNode = null;
    showGreetingChoice(false);
    remember();
    el("messages").replaceChildren();
    try {
      await loadPath();
      setStatus("");
    } catch (error) {
      state.conversation = null;
      setStatus("That conversation could not be opened.", true);
    }
    loadConversations();
  }

  function showGreetingChoice(visible) {
    el("other-greeting").hidden = !visible || !state.character || state.character.greetings.length < 2;
  }

  function showGreeting(position) {
    const greetings = state.character.greetings;
    if (state.greetingNode) state.greetingNode.remove();
    state.greetingNode = null;
    if (!greetings.length) return;
    state.greeting = position % greetings.length;
    state.greetingNode = addMessage("assistant", greetings[state.greeting][1]);
  }

  function newConversation() {
    state.conversation = null;
    state.path = [];
    remember();
    el("messages").replaceChildren();
    state.greetingNode = null;
    if (state.busy) { state.replyNode = null; setStatus(""); setBusy(false); }  // that reply is still stored
    showGreeting(0);
    showGreetingChoice(true);
    // The server's socket may still point at the previous conversation: tell it this one is new.
    if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(JSON.stringify({ type: "new_conversation" }));
    loadConversations();
  }

  async function pickCharacter(slug, conversation) {
    state.character = characters.find((c) => c.slug === slug) || groups.find((g) => g.slug === slug) || null;
    if (!state.character) return;
    document.querySelectorAll(".characters button").forEach((b) =>
      b.setAttribute("aria-pressed", String(b.dataset.slug === slug)));
    el("character-name").textContent = state.character.name;
    el("new-conversation").disabled = false;
    setBusy(false);
    if (conversation) await openConversation(conversation); else newConversation();
    try { await connect(); attach(); } catch (error) { setStatus("Could not connect to the chat server.", true); }
    el("message-input").focus();
  }

  el("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = el("message-input");
    const text = input.value.trim();
    if (!text || state.busy || !state.socket || state.socket.readyState !== WebSocket.OPEN) return;
    addMessage("user", text);
    input.value = "";
    const message = { type: "message", content: text, conversation: state.conversation };
    if (!state.conversation && state.character.greetings.length) message.greeting = state.character.greetings[state.greeting][0];
    showGreetingChoice(false);
    operate(message);
  });
  el("message-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); el("composer").requestSubmit(); }
  });
  el("stop").addEventListener("click", () => send({ type: "stop" }));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.busy) { event.preventDefault(); send({ type: "stop" }); return; }
    // ← / → while a message (or one of its buttons) has focus: its previous / next alternative.
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
    if (event.target.closest("textarea")) return;
    const item = event.target.closest(".message");
    const label = event.key === "ArrowLeft" ? "Previous alternative" : "Next alternative";
    const target = item && item.querySelector(`button[aria-label="${label}"]`);
    if (target && !target.disabled) { event.preventDefault(); target.click(); }
  });
  el("new-conversation").addEventListener("click", newConversation);
  el("other-greeting").addEventListener("click", () => showGreeting(state.greeting + 1));

  for (const character of [...characters, ...groups]) {
    const item = document.createElement("li");
    const entry = document.createElement("button");
    entry.type = "button";
    entry.dataset.slug = character.slug;
    entry.setAttribute("aria-pressed", "false");
    if (character.avatar) {
      const img = document.createElement("img");
      img.src = character.avatar;
      img.alt = "";
      entry.append(img);
    }
    const name = document.createElement("span");
    name.textContent = character.name;
    entry.append(name);
    entry.title = character.description;
    entry.addEventListener("click", () => pickCharacter(character.slug));
    item.append(entry);
    el(character.group ? "groups" : "characters").append(item);
  }

  const params = new URLSearchParams(location.search);
  // A conversation id is a UUID: anything else from the URL (`../../admin/`) would be a path for fetch(); ignored.
  const CONVERSATION_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const conversation = CONVERSATION_ID.test(params.get("conversation") || "") ? params.get("conversation") : null;
  if (params.get("character")) pickCharacter(params.get("character"), conversation);
})();
