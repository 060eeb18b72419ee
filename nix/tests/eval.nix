# Evaluates NixOS modules with nixpkgs' real module system, for the tests:
#
#   import nix/tests/eval.nix {
#     lib = import /path/to/nixpkgs/lib;
#     modules = [ ../module.nix ./my-configuration.nix ];
#     homeManager = true;  # also declare home-manager's NixOS options
#     vm = true;           # also declare what NixOS's test driver declares
#     scriptedInitrd = false;  # a nixpkgs without stage-1.nix's scripted options
#   }
#
# `lib.evalModules` runs on nixos-options.nix (the NixOS options the
# modules read or set, with real lib.types), the given modules, and the
# module arguments `pkgs` (pkgs.nix: real derivations, never built) and
# `utils` (NixOS's utils.nix functions these modules use).  The result is
# evalModules' (config, options, ...), plus `failedAssertions` (the
# messages of false assertions) and `activation` (the activation
# snippets' names in the order NixOS runs them).
{ lib
, modules
, homeManager ? false
, vm ? false
, scriptedInitrd ? true
}:

let
  pkgs = import ./pkgs.nix { inherit lib; };

  # nixos/lib/utils.nix
  utils = rec {
    pathsNeededForBoot = [ "/" "/nix" "/nix/store" "/var" "/var/log" "/var/lib" "/var/lib/nixos" "/etc" "/usr" ];
    fsNeededForBoot = fs: fs.neededForBoot || lib.elem fs.mountPoint pathsNeededForBoot;
    escapeSystemdPath = s:
      let
        trimmed = lib.removeSuffix "/" (lib.removePrefix "/" (lib.strings.normalizePath s));
      in
      lib.replaceStrings [ "/" ] [ "-" ]
        (lib.strings.escapeC [ "-" ] (if trimmed == "" then "/" else trimmed));
  };

  evaluated = lib.evalModules {
    class = "nixos";
    modules = [
      ./nixos-options.nix
      { _module.args = { inherit pkgs utils; }; }
    ]
    ++ lib.optional scriptedInitrd ./scripted-initrd-options.nix
    ++ lib.optional homeManager ./home-manager-options.nix
    ++ lib.optional vm ./vm-options.nix
    ++ modules;
  };

  inherit (evaluated) config;

  # nixos/modules/system/activation/activation-script.nix runs the
  # snippets in this order (textClosureMap over all names).
  activation =
    let
      # Without the whole script that the option's `apply` adds.
      scripts = removeAttrs config.system.activationScripts [ "script" ];
      marked = lib.mapAttrs (name: s: (if lib.isString s then lib.noDepEntry s else s) // { text = name; }) scripts;
    in
    lib.textClosureList marked (lib.attrNames marked);
in
evaluated // {
  inherit pkgs utils activation;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
}
