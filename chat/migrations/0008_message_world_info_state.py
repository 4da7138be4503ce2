"""World Info state per branch: each reply holds the timed effects after it (Message.world_info_state), read by
the next reply on its path. An existing conversation's state moves onto its active leaf (the branch it was
continuing), and the conversation-wide field goes."""

from django.db import migrations, models


def state_onto_active_leaf(apps, schema_editor):
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    for conversation in Conversation.objects.exclude(world_info_state={}).exclude(active=None).iterator():
        message = Message.objects.filter(pk=conversation.active_id).first()
        while message is not None and message.role != "assistant":  # the nearest reply: what the next one reads
            message = Message.objects.filter(pk=message.parent_id).first()
        if message is not None:
            Message.objects.filter(pk=message.pk).update(world_info_state=conversation.world_info_state)


def state_onto_conversation(apps, schema_editor):
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    for conversation in Conversation.objects.exclude(active=None).iterator():
        state = Message.objects.filter(pk=conversation.active_id).values_list("world_info_state", flat=True).first()
        if state:
            Conversation.objects.filter(pk=conversation.pk).update(world_info_state=state)


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0007_usagerecord_end_user'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='world_info_state',
            field=models.JSONField(blank=True, default=dict, help_text='World Info timed effects (sticky, cooldown) after this reply, keyed by scenario id and the message count at which each fired (scenarios/world_info.py). The next reply on this branch reads them from the nearest reply on its path, so branches keep their own.'),
        ),
        migrations.RunPython(state_onto_active_leaf, state_onto_conversation),
        migrations.RemoveField(
            model_name='conversation',
            name='world_info_state',
        ),
    ]
