// The chat page: characters, past conversations, and replies streamed over the WebSocket.
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
                  greetingNode: null, username: usernameNode ? JSON.parse(usernameNode.textContent) : "" };

  const FRIENDLY = {
    model_unavailable: "The model is unavailable right now. Please try again later.",
    rate_limit_exceeded: "You are sending messages too quickly. Wait a moment and try again.",
    context_length_exceeded: "This conversation has grown too long for the model. Start a new conversation.",
    character_not_found: "This character is no longer available.",
    conversation_not_found: "This conversation no longer exists. Start a new one.",
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

  function remember() {
    const params = new URLSearchParams();
    if (state.character) params.set("character", state.character.slug);
    if (state.conversation) params.set("conversation", state.conversation);
    history.replaceState(null, "", "?" + params.toString());
  }

  function setBusy(busy) {
    state.busy = busy;
    el("send").disabled = busy || !state.character;
    el("message-input").disabled = !state.character;
  }

  function connect() {
    if (state.socket) state.socket.close();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/chat/${state.character.slug}/`);
    socket.onmessage = (message) => handleEvent(JSON.parse(message.data));
    socket.onclose = () => { if (state.busy) { setStatus("The connection was lost. Please resend.", true); setBusy(false); } };
    state.socket = socket;
    return new Promise((resolve, reject) => {
      socket.onopen = resolve;
      socket.onerror = () => reject(new Error("WebSocket failed"));
    });
  }

  function handleEvent(event) {
    if (event.type === "start") {
      state.replyNode = addMessage("assistant", "");
      state.replyNode.setAttribute("aria-busy", "true");
      setSpeaker(state.replyNode, event.speaker);
      setStatus(`${event.speaker ? event.speaker.name : state.character.name} is typing…`);
    } else if (event.type === "token") {
      if (!state.replyNode) return;  // the tail of a reply abandoned by "New conversation"
      state.replyNode.querySelector(".text").textContent += event.text;
    } else if (event.type === "end") {
      if (!state.replyNode) return;
      state.replyNode.querySelector(".text").textContent = event.text;
      state.replyNode.removeAttribute("aria-busy");
      state.replyNode.dataset.complete = "true";
      noteScenarios(state.replyNode, event.scenarios);
      state.conversation = event.conversation;
      remember();
      setStatus("");
      setBusy(false);
      loadConversations();
    } else if (event.type === "error") {
      if (state.replyNode && !state.replyNode.dataset.complete) state.replyNode.remove();
      state.replyNode = null;
      setStatus(friendlyError(event), true);
      setBusy(false);
    }
  }

  async function api(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) throw new Error((await response.json()).error?.message || response.statusText);
    return response.json();
  }

  async function loadConversations() {
    const list = el("conversations");
    list.replaceChildren();
    if (!state.character) return;
    const filter = state.character.group ? "group" : "character";
    const page = await api(`/v1/conversations/?${filter}=${encodeURIComponent(state.character.slug)}`);
    for (const conversation of page.results) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = conversation.title || "Untitled chat";
      button.setAttribute("aria-current", String(conversation.id === state.conversation));
      button.addEventListener("click", () => openConversation(conversation.id));
      item.append(button);
      list.append(item);
    }
  }

  async function openConversation(id) {
    state.conversation = id;
    showGreetingChoice(false);
    remember();
    el("messages").replaceChildren();
    try {
      const page = await api(`/v1/conversations/${id}/messages/?limit=500`);
      for (const message of page.results) {
        const mine = !message.author || message.author === state.username;
        const item = addMessage(message.role, message.content, message.role === "user" && !mine ? message.author : undefined);
        if (message.role === "assistant") { setSpeaker(item, speakerOf(message.speaker)); noteScenarios(item, message.scenarios); }
      }
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
    remember();
    el("messages").replaceChildren();
    state.greetingNode = null;
    if (state.busy) { state.replyNode = null; setStatus(""); setBusy(false); }  // the server cancels that reply
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
    try { await connect(); } catch (error) { setStatus("Could not connect to the chat server.", true); }
    el("message-input").focus();
  }

  el("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = el("message-input");
    const text = input.value.trim();
    if (!text || state.busy || !state.socket || state.socket.readyState !== WebSocket.OPEN) return;
    addMessage("user", text);
    input.value = "";
    setBusy(true);
    setStatus("Sending…");
    const message = { type: "message", content: text, conversation: state.conversation };
    if (!state.conversation && state.character.greetings.length) message.greeting = state.character.greetings[state.greeting][0];
    showGreetingChoice(false);
    state.socket.send(JSON.stringify(message));
  });
  el("message-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); el("composer").requestSubmit(); }
  });
  el("new-conversation").addEventListener("click", newConversation);
  el("other-greeting").addEventListener("click", () => showGreeting(state.greeting + 1));

  for (const character of [...characters, ...groups]) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.slug = character.slug;
    button.setAttribute("aria-pressed", "false");
    if (character.avatar) {
      const img = document.createElement("img");
      img.src = character.avatar;
      img.alt = "";
      button.append(img);
    }
    const name = document.createElement("span");
    name.textContent = character.name;
    button.append(name);
    button.title = character.description;
    button.addEventListener("click", () => pickCharacter(character.slug));
    item.append(button);
    el(character.group ? "groups" : "characters").append(item);
  }

  const params = new URLSearchParams(location.search);
  if (params.get("character")) pickCharacter(params.get("character"), params.get("conversation"));
})();
