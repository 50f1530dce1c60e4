"""A small square arena with coloured objects, a unicycle robot and its pinhole camera.

Everything an episode needs is sampled from one seed (layout, start pose, lighting, sensor
noise), so an episode can be rebuilt exactly from its seed. The camera image is drawn with
OpenCV by the painter's algorithm (background, floor lines, walls, shadows, then objects far to
near): a few dozen filled polygons per frame, a couple of milliseconds at 320x240, which is what
lets a model be trained on tens of thousands of frames on a laptop CPU.

Coordinates: world x/y on the floor (metres, origin at the arena centre), z up; yaw is
counter-clockwise from +x. Bearings are positive to the robot's left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Base albedo of each colour name (RGB). Kept far apart in hue so that lighting tints and
# noise never make one colour look like another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 30),
}

# Footprint radius (m) and height (m) of each shape. The footprint radius is what collisions,
# spacing and the success distance use.
SHAPES: dict[str, tuple[float, float]] = {
    "ball": (0.22, 0.44),
    "cube": (0.28, 0.40),  # a 0.40 m cube: half-diagonal 0.28
    "cylinder": (0.19, 0.46),
    "cone": (0.23, 0.50),
}

_NEAR = 0.05  # near clipping plane (m): polygons crossing it are clipped, not dropped
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel vertex positions keep small objects steady
_NOISE_PAD = 16  # noise banks are this much larger than the frame; per-frame offsets vary them


class WorldConfig(BaseModel):
    """Arena, camera and episode-sampling parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(320, ge=16, le=4096)
    height: int = Field(240, ge=16, le=4096)
    hfov_deg: float = Field(70.0, gt=10.0, lt=170.0)
    camera_height: float = Field(0.35, gt=0.0)
    camera_pitch_deg: float = Field(12.0, ge=0.0, lt=60.0)  # downward tilt: near floor in view
    camera_forward: float = 0.10  # camera ahead of the robot centre (m)
    arena_size: float = Field(6.0, gt=2.0)
    wall_height: float = Field(0.6, gt=0.0)
    robot_radius: float = Field(0.15, gt=0.0)
    success_radius: float = Field(0.5, gt=0.0)  # robot centre to target centre (m)
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = tuple(SHAPES)
    min_distractors: int = Field(2, ge=0)
    max_distractors: int = Field(4, ge=0)
    p_target_in_view: float = Field(0.4, ge=0.0, le=1.0)  # else the episode starts with a search
    min_start_distance: float = Field(1.5, gt=0.0)
    max_noise_sigma: float = Field(6.0, ge=0.0)  # per-episode Gaussian pixel noise, 0..this
    max_brightness_jitter: float = Field(0.25, ge=0.0, lt=1.0)
    max_tint_jitter: float = Field(0.08, ge=0.0, lt=0.5)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float
    y: float
    yaw: float = 0.0

    @property
    def radius(self) -> float:
        return SHAPES[self.shape][0]

    @property
    def height(self) -> float:
        return SHAPES[self.shape][1]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Robot:
    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0


@dataclass(frozen=True)
class Lighting:
    brightness: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    light_dir: tuple[float, float, float] = (0.4, 0.3, 0.866)  # unit vector towards the light
    noise_sigma: float = 0.0


@dataclass
class _Face:
    """A flat convex polygon in world coordinates with its precomputed colour."""

    vertices: np.ndarray  # (N, 3)
    normal: np.ndarray  # (3,) outward
    colour: tuple[float, float, float]
    two_sided: bool = False  # walls and floor marks: no back-face culling


@dataclass
class _Drawable:
    """One object as the renderer sees it: faces (or a sphere) and a floor shadow."""

    obj: SceneObject
    faces: list[_Face] = field(default_factory=list)
    sphere: tuple[np.ndarray, float, list[tuple[float, float, float]]] | None = None
    shadow: _Face | None = None


def wrap_angle(a: float) -> float:
    """Angle in [-pi, pi)."""
    return (a + math.pi) % (2.0 * math.pi) - math.pi


class World:
    """One episode's world: objects, target, robot, lighting, and the camera renderer."""

    def __init__(self, config: WorldConfig | None = None, seed: int = 0) -> None:
        self.config = config or WorldConfig()
        c = self.config
        self.fx = (c.width / 2.0) / math.tan(math.radians(c.hfov_deg) / 2.0)
        self.fy = self.fx  # square pixels
        self.cx = c.width / 2.0
        self.cy = c.height / 2.0
        self.reset(seed)

    # ------------------------------------------------------------------ episode sampling
    def reset(self, seed: int) -> None:
        """Sample a new episode (layout, target, start pose, lighting, noise) from `seed`."""
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.lighting = self._sample_lighting(rng)
        objects, target_index, robot = self._sample_layout(rng)
        self._noise_rng_seed = int(rng.integers(2**31))
        self._build_noise()
        self.set_scene(objects, target_index, robot)

    def set_scene(self, objects: list[SceneObject], target_index: int, robot: Robot) -> None:
        """Replace the layout (tests and hand-made scenes); lighting and noise are kept."""
        self.objects = list(objects)
        self.target_index = int(target_index)
        self.robot = Robot(robot.x, robot.y, robot.yaw)
        self._background = self._render_background()
        self._static_faces = self._build_walls()
        self._floor_lines = self._build_floor_lines()
        self._drawables = [self._build_drawable(o) for o in self.objects]

    @property
    def target(self) -> SceneObject:
        return self.objects[self.target_index]

    @property
    def instruction(self) -> str:
        return f"go to the {self.target.colour} {self.target.shape}"

    def _sample_lighting(self, rng: np.random.Generator) -> Lighting:
        c = self.config
        brightness = 1.0 + rng.uniform(-c.max_brightness_jitter, c.max_brightness_jitter)
        tint = tuple(float(t) for t in 1.0 + rng.uniform(-c.max_tint_jitter, c.max_tint_jitter, 3))
        azimuth = rng.uniform(0.0, 2.0 * math.pi)
        elevation = rng.uniform(math.radians(35.0), math.radians(75.0))
        light = (
            math.cos(elevation) * math.cos(azimuth),
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
        )
        sigma = float(rng.uniform(0.0, c.max_noise_sigma))
        return Lighting(float(brightness), tint, light, sigma)  # type: ignore[arg-type]

    def _sample_layout(self, rng: np.random.Generator) -> tuple[list[SceneObject], int, Robot]:
        c = self.config
        half = c.arena_size / 2.0 - 0.6  # keep objects and the start off the walls
        pairs = [(col, shp) for col in c.colours for shp in c.shapes]
        for _ in range(10_000):  # rejection sampling; a valid layout is found in a few tries
            target_pair = pairs[int(rng.integers(len(pairs)))]
            # Distractors never repeat the target's colour+shape pair, so the instruction
            # names exactly one object; they may share its colour or its shape.
            others = [p for p in pairs if p != target_pair]
            n = int(rng.integers(c.min_distractors, c.max_distractors + 1))
            chosen = [others[i] for i in rng.choice(len(others), size=min(n, len(others)), replace=False)]
            objects: list[SceneObject] = []
            for colour, shape in [target_pair, *chosen]:
                for _ in range(200):
                    x, y = rng.uniform(-half, half, 2)
                    cand = SceneObject(shape, colour, float(x), float(y), float(rng.uniform(0, math.pi)))
                    if all(math.hypot(o.x - x, o.y - y) > o.radius + cand.radius + 0.4 for o in objects):
                        objects.append(cand)
                        break
            if len(objects) != 1 + len(chosen):
                continue
            target = objects[0]
            x, y = (float(v) for v in rng.uniform(-half, half, 2))
            if math.hypot(target.x - x, target.y - y) < c.min_start_distance:
                continue
            # The straight path to the target must be clear of distractors: the expert drives
            # straight at the target and does not plan around obstacles.
            clear = c.robot_radius + 0.2
            if any(_point_segment_distance(o.x, o.y, x, y, target.x, target.y) < o.radius + clear for o in objects[1:]):
                continue
            half_fov = math.radians(c.hfov_deg) / 2.0
            if rng.uniform() < c.p_target_in_view:
                bearing = rng.uniform(-(half_fov - 0.15), half_fov - 0.15)
            else:
                bearing = rng.uniform(half_fov, 2.0 * math.pi - half_fov)
            yaw = wrap_angle(math.atan2(target.y - y, target.x - x) - bearing)
            # The target is listed first while sampling; shuffle so its index carries no signal.
            order = rng.permutation(len(objects))
            shuffled = [objects[i] for i in order]
            return shuffled, int(np.argwhere(order == 0)[0, 0]), Robot(x, y, yaw)
        raise RuntimeError("could not sample a layout; the arena is too small for the objects")

    # ------------------------------------------------------------------ robot and geometry
    def step(self, linear_x: float, angular_z: float, dt: float) -> bool:
        """Advance the unicycle by `dt` seconds. Returns False if a collision blocked motion.

        A blocked move keeps the position but applies the turn, so the robot never enters
        an object or a wall (the camera would otherwise see the inside of a polygon).
        """
        r = self.robot
        yaw_mid = r.yaw + 0.5 * angular_z * dt  # midpoint rule: exact enough for small dt
        nx = r.x + linear_x * dt * math.cos(yaw_mid)
        ny = r.y + linear_x * dt * math.sin(yaw_mid)
        r.yaw = wrap_angle(r.yaw + angular_z * dt)
        if self._collides(nx, ny):
            return False
        r.x, r.y = nx, ny
        return True

    def _collides(self, x: float, y: float) -> bool:
        c = self.config
        lim = c.arena_size / 2.0 - c.robot_radius
        if abs(x) > lim or abs(y) > lim:
            return True
        return any(math.hypot(o.x - x, o.y - y) < o.radius + c.robot_radius for o in self.objects)

    def camera_position(self) -> tuple[float, float, float]:
        r, c = self.robot, self.config
        return (
            r.x + c.camera_forward * math.cos(r.yaw),
            r.y + c.camera_forward * math.sin(r.yaw),
            c.camera_height,
        )

    def bearing_to(self, obj: SceneObject) -> float:
        """Angle from the camera's forward direction to the object's centre (rad, + = left)."""
        cx, cy, _ = self.camera_position()
        return wrap_angle(math.atan2(obj.y - cy, obj.x - cx) - self.robot.yaw)

    def distance_to(self, obj: SceneObject) -> float:
        """Robot centre to object centre on the floor (m)."""
        return math.hypot(obj.x - self.robot.x, obj.y - self.robot.y)

    def in_view(self, obj: SceneObject, margin_rad: float = 0.05) -> bool:
        """Whether the object's centre is inside the horizontal field of view (less a margin)."""
        return abs(self.bearing_to(obj)) <= math.radians(self.config.hfov_deg) / 2.0 - margin_rad

    # ------------------------------------------------------------------ rendering
    def render(self, noise_key: int = 0) -> np.ndarray:
        """The camera image, RGB uint8 (height, width, 3).

        Deterministic in (seed, scene state, noise_key); pass the frame index as `noise_key`
        so that consecutive frames get different sensor noise.
        """
        img = self._background.copy()
        rot, cam = self._camera_frame()
        for a, b, colour in self._floor_lines:
            seg = _clip_segment(_to_camera(np.stack([a, b]), rot, cam))
            if seg is not None:
                p = self._project(seg)
                cv2.line(img, tuple(p[0]), tuple(p[1]), colour, 1, cv2.LINE_AA, _SHIFT)
        for face in self._static_faces:
            self._draw_face(img, face, rot, cam)
        for d in self._drawables:
            if d.shadow is not None:
                self._draw_face(img, d.shadow, rot, cam)
        # Painter's algorithm: objects far to near. Footprints never overlap, so centre
        # distance orders them correctly.
        order = sorted(self._drawables, key=lambda d: -((d.obj.x - cam[0]) ** 2 + (d.obj.y - cam[1]) ** 2))
        for d in order:
            if d.sphere is not None:
                self._draw_sphere(img, d.sphere, rot, cam)
            for face in d.faces:
                self._draw_face(img, face, rot, cam)
        return self._add_noise(img, noise_key)

    def _camera_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `rot` are the camera's right, down and forward axes in world coordinates."""
        yaw, pitch = self.robot.yaw, math.radians(self.config.camera_pitch_deg)
        f = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        up = np.array([0.0, 0.0, 1.0])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        forward = math.cos(pitch) * f - math.sin(pitch) * up
        down = -(math.sin(pitch) * f + math.cos(pitch) * up)
        return np.stack([right, down, forward]), np.array(self.camera_position())

    def _project(self, pts_cam: np.ndarray) -> np.ndarray:
        """Camera coordinates (N, 3) with z >= near -> fixed-point pixel coordinates (N, 2)."""
        z = pts_cam[:, 2]
        u = self.cx + self.fx * pts_cam[:, 0] / z
        v = self.cy + self.fy * pts_cam[:, 1] / z
        # Clamp: a vertex just past the near plane can project far outside the image.
        uv = np.clip(np.stack([u, v], axis=1), -1e5, 1e5)
        return np.round(uv * (1 << _SHIFT)).astype(np.int32)

    def _draw_face(self, img: np.ndarray, face: _Face, rot: np.ndarray, cam: np.ndarray) -> None:
        if not face.two_sided and float(np.dot(face.vertices[0] - cam, face.normal)) >= 0.0:
            return  # back face
        poly = _clip_polygon(_to_camera(face.vertices, rot, cam))
        if poly is not None:
            cv2.fillConvexPoly(img, self._project(poly), face.colour, cv2.LINE_AA, _SHIFT)

    def _draw_sphere(self, img: np.ndarray, sphere, rot: np.ndarray, cam: np.ndarray) -> None:
        centre, radius, shades = sphere
        pc = _to_camera(centre[None], rot, cam)[0]
        if pc[2] < radius + _NEAR:
            return
        (u, v), = self._project(pc[None])
        r_px = self.fx * radius / math.sqrt(pc[2] ** 2 - radius**2)  # silhouette radius
        # Shading: dark body, then lighter discs shifted toward the light in the image.
        lx, ly, _ = rot @ np.array(self.lighting.light_dir)
        norm = math.hypot(lx, ly) or 1.0
        ox, oy = lx / norm, ly / norm
        one = 1 << _SHIFT
        for scale, shift, colour in ((1.0, 0.0, shades[0]), (0.78, 0.18, shades[1]), (0.42, 0.40, shades[2])):
            rr = int(round(r_px * scale * one))
            if rr <= 0:
                continue
            du, dv = int(round(ox * shift * r_px * one)), int(round(oy * shift * r_px * one))
            cv2.circle(img, (int(u) + du, int(v) + dv), rr, colour, -1, cv2.LINE_AA, _SHIFT)

    def _add_noise(self, img: np.ndarray, key: int) -> np.ndarray:
        if self._noise_pos is None:
            return img
        h, w = img.shape[:2]
        # Cheap per-frame noise: a window of a precomputed bank at a key-dependent offset.
        k = (key * 2654435761) & 0xFFFFFFFF
        oy, ox = k % _NOISE_PAD, (k >> 8) % _NOISE_PAD
        qy, qx = (k >> 16) % _NOISE_PAD, (k >> 24) % _NOISE_PAD
        cv2.add(img, self._noise_pos[oy : oy + h, ox : ox + w], dst=img)
        cv2.subtract(img, self._noise_neg[qy : qy + h, qx : qx + w], dst=img)
        return img

    # ------------------------------------------------------------------ scene building
    def _shade(self, rgb, normal, ambient: float = 0.45, diffuse: float = 0.65) -> tuple[float, float, float]:
        lit = ambient + diffuse * max(0.0, float(np.dot(normal, self.lighting.light_dir)))
        b, t = self.lighting.brightness, self.lighting.tint
        return tuple(float(min(255.0, rgb[i] * lit * b * t[i])) for i in range(3))  # type: ignore[return-value]

    def _build_noise(self) -> None:
        sigma = self.lighting.noise_sigma
        if sigma < 0.5:
            self._noise_pos = self._noise_neg = None
            return
        rng = np.random.default_rng(self._noise_rng_seed)
        shape = (self.config.height + _NOISE_PAD, self.config.width + _NOISE_PAD, 3)
        noise = rng.normal(0.0, sigma, shape).round()
        self._noise_pos = np.clip(noise, 0, 255).astype(np.uint8)
        self._noise_neg = np.clip(-noise, 0, 255).astype(np.uint8)

    def _render_background(self) -> np.ndarray:
        """Sky above the horizon, a floor that brightens toward the camera below it."""
        c, b, t = self.config, self.lighting.brightness, np.array(self.lighting.tint)
        horizon = self.cy - self.fy * math.tan(math.radians(c.camera_pitch_deg))
        rows = np.arange(c.height, dtype=np.float32)[:, None]
        sky = np.array([95.0, 100.0, 112.0]) + 40.0 * np.clip((horizon - rows) / max(horizon, 1.0), 0, 1)
        depth = np.clip((rows - horizon) / max(c.height - horizon, 1.0), 0, 1)
        floor = np.array([150.0, 128.0, 100.0]) * (0.65 + 0.45 * depth)
        col = np.where(rows < horizon, sky, floor) * b * t
        return np.ascontiguousarray(np.broadcast_to(np.clip(col, 0, 255).astype(np.uint8)[:, None, :], (c.height, c.width, 3)))

    def _build_walls(self) -> list[_Face]:
        c = self.config
        h = c.arena_size / 2.0
        corners = [(h, -h), (h, h), (-h, h), (-h, -h)]
        base = (205.0, 198.0, 185.0)
        faces = []
        for i in range(4):
            (x0, y0), (x1, y1) = corners[i], corners[(i + 1) % 4]
            inward = np.array([-(x0 + x1) / 2.0, -(y0 + y1) / 2.0, 0.0]) / h
            wall = self._shade(base, inward, ambient=0.55, diffuse=0.5)
            skirt = tuple(0.55 * v for v in wall)
            # A dark skirting board marks where the wall meets the floor (a depth cue).
            for z0, z1, colour in ((0.0, 0.08, skirt), (0.08, c.wall_height, wall)):
                verts = np.array([[x0, y0, z0], [x1, y1, z0], [x1, y1, z1], [x0, y0, z1]])
                faces.append(_Face(verts, inward, colour, two_sided=True))  # type: ignore[arg-type]
        return faces

    def _build_floor_lines(self) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
        """A 1 m grid on the floor: gives the image texture that moves with the robot."""
        h = self.config.arena_size / 2.0
        colour = self._shade((120.0, 100.0, 78.0), np.array([0.0, 0.0, 1.0]), ambient=0.75, diffuse=0.0)
        lines = []
        for k in np.arange(-math.floor(h) + 1, math.floor(h)):
            if abs(k) >= h:
                continue
            lines.append((np.array([k, -h, 0.0]), np.array([k, h, 0.0]), colour))
            lines.append((np.array([-h, k, 0.0]), np.array([h, k, 0.0]), colour))
        return lines

    def _build_drawable(self, o: SceneObject) -> _Drawable:
        rgb = COLOURS[o.colour]
        d = _Drawable(o)
        angles = np.linspace(0.0, 2.0 * math.pi, 13)[:-1]
        ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        shadow_verts = np.concatenate([ring * o.radius * 1.15 + [o.x, o.y], np.full((12, 1), 0.002)], axis=1)
        shadow_colour = tuple(v * 0.55 * self.lighting.brightness for v in (150.0, 128.0, 100.0))
        d.shadow = _Face(shadow_verts, np.array([0.0, 0.0, 1.0]), shadow_colour, two_sided=True)  # type: ignore[arg-type]
        if o.shape == "ball":
            r = o.radius
            up = np.array([0.0, 0.0, 1.0])
            light = np.array(self.lighting.light_dir)
            shades = [
                self._shade(rgb, up, ambient=0.40, diffuse=0.0),
                self._shade(rgb, light, ambient=0.30, diffuse=0.55),
                self._shade(rgb, light, ambient=0.40, diffuse=0.75),
            ]
            d.sphere = (np.array([o.x, o.y, r]), r, shades)
        elif o.shape == "cube":
            s = o.height / 2.0
            ca, sa = math.cos(o.yaw), math.sin(o.yaw)
            axes = [np.array([ca, sa, 0.0]), np.array([-sa, ca, 0.0])]
            centre = np.array([o.x, o.y, s])
            for ax, other in ((axes[0], axes[1]), (axes[1], axes[0])):
                for sign in (1.0, -1.0):
                    n = sign * ax
                    fc = centre + n * s
                    verts = np.array([fc + other * s + [0, 0, -s], fc - other * s + [0, 0, -s],
                                      fc - other * s + [0, 0, s], fc + other * s + [0, 0, s]])
                    d.faces.append(_Face(verts, n, self._shade(rgb, n)))
            top = centre + [0, 0, s]
            verts = np.array([top + axes[0] * s + axes[1] * s, top - axes[0] * s + axes[1] * s,
                              top - axes[0] * s - axes[1] * s, top + axes[0] * s - axes[1] * s])
            d.faces.append(_Face(verts, np.array([0.0, 0.0, 1.0]), self._shade(rgb, np.array([0.0, 0.0, 1.0]))))
        elif o.shape == "cylinder":
            r, hgt = o.radius, o.height
            pts = ring * r + [o.x, o.y]
            for i in range(12):
                a, b = pts[i], pts[(i + 1) % 12]
                mid = (angles[i] + angles[(i + 1) % 12] + (2 * math.pi if i == 11 else 0.0)) / 2.0
                n = np.array([math.cos(mid), math.sin(mid), 0.0])
                verts = np.array([[a[0], a[1], 0.0], [b[0], b[1], 0.0], [b[0], b[1], hgt], [a[0], a[1], hgt]])
                d.faces.append(_Face(verts, n, self._shade(rgb, n)))
            top = np.concatenate([pts, np.full((12, 1), hgt)], axis=1)
            d.faces.append(_Face(top, np.array([0.0, 0.0, 1.0]), self._shade(rgb, np.array([0.0, 0.0, 1.0]))))
        elif o.shape == "cone":
            r, hgt = o.radius, o.height
            pts = ring * r + [o.x, o.y]
            apex = np.array([o.x, o.y, hgt])
            slope = r / hgt
            for i in range(12):
                a, b = pts[i], pts[(i + 1) % 12]
                mid = (angles[i] + angles[(i + 1) % 12] + (2 * math.pi if i == 11 else 0.0)) / 2.0
                n = np.array([math.cos(mid), math.sin(mid), slope])
                n /= np.linalg.norm(n)
                verts = np.array([[a[0], a[1], 0.0], [b[0], b[1], 0.0], apex])
                d.faces.append(_Face(verts, n, self._shade(rgb, n)))
        else:
            raise ValueError(f"unknown shape {o.shape!r}; known: {sorted(SHAPES)}")
        return d


# ---------------------------------------------------------------------- geometry helpers
def _to_camera(pts: np.ndarray, rot: np.ndarray, cam: np.ndarray) -> np.ndarray:
    return (pts - cam) @ rot.T


def _clip_polygon(poly: np.ndarray) -> np.ndarray | None:
    """Sutherland-Hodgman against the near plane z = _NEAR (camera coordinates)."""
    inside = poly[:, 2] >= _NEAR
    if inside.all():
        return poly
    if not inside.any():
        return None
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ia, ib = inside[i], inside[(i + 1) % n]
        if ia:
            out.append(a)
        if ia != ib:
            t = (_NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out) if len(out) >= 3 else None


def _clip_segment(seg: np.ndarray) -> np.ndarray | None:
    a, b = seg
    if a[2] < _NEAR and b[2] < _NEAR:
        return None
    if a[2] < _NEAR or b[2] < _NEAR:
        t = (_NEAR - a[2]) / (b[2] - a[2])
        p = a + t * (b - a)
        return np.stack([p, b]) if a[2] < _NEAR else np.stack([a, p])
    return seg


def _point_segment_distance(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> float:
    dx, dy = bx - ax, by - ay
    t = ((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-12)
    t = min(1.0, max(0.0, t))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))
