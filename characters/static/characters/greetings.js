// The admin's alternate greetings list: "Add another greeting" appends an empty box.
document.addEventListener("click", (event) => {
  const button = event.target.closest(".greeting-add");
  if (!button) return;
  const list = button.parentElement.querySelector("ol");
  const item = document.createElement("li");
  const box = document.createElement("textarea");
  box.name = button.dataset.name;
  box.rows = 3;
  box.cols = 80;
  box.className = "vLargeTextField";
  box.setAttribute("aria-label", `Alternate greeting ${list.children.length + 1}`);
  item.append(box);
  list.append(item);
  box.focus();
});
