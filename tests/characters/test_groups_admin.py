"""Character groups are edited in the admin and listed by the API for the group picker."""

import pytest
from django.urls import reverse

from characters.models import CharacterGroup, GroupMember
from tests.factories import make_api_client, make_character

pytestmark = pytest.mark.django_db


def test_a_group_is_made_in_the_admin_with_its_members_in_order(staff_client):
    ada, bob = make_character("ada", name="Ada"), make_character("bob", name="Bob")
    assert staff_client.get(reverse("admin:characters_charactergroup_add")).status_code == 200
    data = {"name": "Crew", "slug": "crew", "is_active": "on", "turn_mode": "round_robin", "scenario": "A storm.",
            "memberships-TOTAL_FORMS": "2", "memberships-INITIAL_FORMS": "0", "memberships-MIN_NUM_FORMS": "0",
            "memberships-MAX_NUM_FORMS": "1000",
            "memberships-0-character": str(bob.pk), "memberships-0-position": "1",
            "memberships-1-character": str(ada.pk), "memberships-1-position": "0"}
    response = staff_client.post(reverse("admin:characters_charactergroup_add"), data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert CharacterGroup.objects.get(slug="crew").member_list() == [ada, bob]


def test_a_group_slug_may_not_be_a_characters(staff_client):
    make_character("ada", name="Ada")
    data = {"name": "Ada", "slug": "ada", "turn_mode": "natural", "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0", "memberships-MIN_NUM_FORMS": "0", "memberships-MAX_NUM_FORMS": "1000"}
    response = staff_client.post(reverse("admin:characters_charactergroup_add"), data)
    assert response.status_code == 200 and "A character has this slug" in response.content.decode()


def test_the_api_lists_active_groups_with_their_members():
    ada, bob = make_character("ada", name="Ada"), make_character("bob", name="Bob")
    crew = CharacterGroup.objects.create(name="Crew", slug="crew")
    GroupMember.objects.create(group=crew, character=ada, position=0)
    GroupMember.objects.create(group=crew, character=bob, position=1)
    CharacterGroup.objects.create(name="Old", slug="old", is_active=False)
    groups = make_api_client("sam").get("/v1/groups/").json()
    assert [g["slug"] for g in groups] == ["crew"]
    assert [m["slug"] for m in groups[0]["members"]] == ["ada", "bob"]
