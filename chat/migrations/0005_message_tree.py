"""Conversations become trees: each message has a parent, each conversation an active leaf.

Existing conversations become a single path: each message's parent is the one before it (by id),
and the last message is the active leaf.
"""

import django.db.models.deletion
from django.db import migrations, models


def messages_into_paths(apps, schema_editor):
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    for conversation in Conversation.objects.all().iterator():
        previous = None
        for message in Message.objects.filter(conversation=conversation).order_by("id").iterator():
            if previous is not None:
                Message.objects.filter(pk=message.pk).update(parent=previous)
            previous = message.pk
        if previous is not None:
            # update(), not save(): updated_at (auto_now) is the history's version and stays as it was.
            Conversation.objects.filter(pk=conversation.pk).update(active=previous)


def paths_into_lists(apps, schema_editor):
    """Backwards: only the active branch of each conversation is kept as its list of messages."""
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    for conversation in Conversation.objects.all().iterator():
        keep, node = set(), conversation.active_id
        parents = dict(Message.objects.filter(conversation=conversation).values_list("id", "parent_id"))
        while node is not None:
            keep.add(node)
            node = parents.get(node)
        if keep:
            Message.objects.filter(conversation=conversation).exclude(pk__in=keep).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0004_apikey_quotas_usagerecord"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="parent",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name="children",
                to="chat.message",
                help_text="The message this one answers or follows; siblings are alternatives (swipes, edits). "
                          "Deleting a message deletes its subtree."),
        ),
        migrations.AddField(
            model_name="message",
            name="stopped",
            field=models.BooleanField(default=False, help_text="The reply was stopped before its end (by its owner, or "
                                      "when its client stayed away too long); the text is what had been generated."),
        ),
        migrations.AlterField(
            model_name="message",
            name="finish_reason",
            field=models.CharField(blank=True, max_length=16,
                                   help_text="Why generation stopped: stop, length, or cancelled (see stopped)."),
        ),
        migrations.AddField(
            model_name="conversation",
            name="active",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="+",
                to="chat.message",
                help_text="The leaf of the branch shown and continued: the model sees the path from the root to it."),
        ),
        migrations.RunPython(messages_into_paths, paths_into_lists),
    ]
